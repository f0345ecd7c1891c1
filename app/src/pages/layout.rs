//! The frame around every signed-in page: top bar, navigation, content.

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::{A, Outlet};

use crate::api::session::whoami;

/// Top bar, side navigation and the routed page.
#[component]
pub fn Layout() -> impl IntoView {
    let me = Resource::new(|| (), |()| whoami());
    view! {
        <div class="shell">
            <header class="topbar">
                <a class="brand" href="/devices">"Updraft"</a>
                <div class="spacer"></div>
                <Suspense fallback=|| ()>
                    {move || {
                        me.get()
                            .and_then(Result::ok)
                            .map(|me| view! { <span class="user" title="Signed in">{me.username}</span> })
                    }}
                </Suspense>
                <form method="post" action="/auth/logout">
                    <button type="submit" class="link">"Sign out"</button>
                </form>
            </header>
            <nav class="sidenav" aria-label="Main">
                <A href="/devices">"Devices"</A>
                <A href="/groups">"Groups"</A>
                <A href="/products">"Products"</A>
                <span class="nav-section">"Software/Firmware Upgrades"</span>
                <A href="/upgrades" exact=true attr:class="sub">"Upgrade tasks"</A>
                <A href="/upgrades/packages" attr:class="sub">"Packages"</A>
                <span class="nav-section">"Project"</span>
                <A href="/settings" exact=true>"Settings"</A>
                <A href="/settings/audit" attr:class="sub">"Audit log"</A>
                <A href="/api-reference">"API reference"</A>
            </nav>
            <main class="content">
                <Outlet />
            </main>
        </div>
    }
}

/// Any unknown path.
#[component]
pub fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    {
        if let Some(resp) = use_context::<leptos_axum::ResponseOptions>() {
            resp.set_status(axum::http::StatusCode::NOT_FOUND);
        }
    }
    view! {
        <Title text="Not found" />
        <main class="login">
            <div class="card login-card">
                <h1>"Not found"</h1>
                <p>"There is no page here."</p>
                <a class="button" href="/devices">"Go to Devices"</a>
            </div>
        </main>
    }
}
