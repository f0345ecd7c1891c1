//! The login page. The form posts to the server's `/auth/login` handler (plain HTML, no JavaScript
//! needed), which sets the session cookie and redirects.

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::hooks::use_query_map;

/// The message for an `error` code in the query string. Codes, not text, travel in the URL, so a crafted
/// link cannot put words on this page.
fn message(code: &str) -> &'static str {
    match code {
        "invalid" => "Wrong user name or password.",
        "throttled" => "Too many failed attempts. Wait a few minutes, then try again.",
        "busy" => "The server is busy checking other sign-ins. Try again in a moment.",
        "expired" => "Your session expired. Please sign in again.",
        "csrf" => "The form came from another site and was refused. Please sign in here.",
        _ => "Sign-in failed. Please try again.",
    }
}

/// `/login`
#[component]
pub fn LoginPage() -> impl IntoView {
    let query = use_query_map();
    let error = move || query.read().get("error").map(|code| message(&code));
    let next = move || {
        query
            .read()
            .get("next")
            .filter(|n| n.starts_with('/') && !n.starts_with("//"))
            .unwrap_or_default()
    };
    view! {
        <Title text="Sign in" />
        <main class="login">
            <form class="card login-card" method="post" action="/auth/login">
                <h1 class="brand-large">"Updraft"</h1>
                <p class="muted">"Over-the-air upgrades for your fleet"</p>
                {move || error().map(|m| view! { <p class="alert error" role="alert">{m}</p> })}
                <label>
                    "User name"
                    <input name="username" autocomplete="username" required autofocus />
                </label>
                <label>
                    "Password"
                    <input type="password" name="password" autocomplete="current-password" required />
                </label>
                <input type="hidden" name="next" value=next />
                <button type="submit" class="primary">"Sign in"</button>
            </form>
        </main>
    }
}
