//! Updraft's web console: Leptos components, routes and server functions.
//!
//! - [`shell`] is the HTML document the server renders; [`App`] is the router.
//! - [`api`]: server functions (`#[server]`, POST `/api/...`) and the DTOs they exchange.
//! - [`pages`]: one component per page (`LoginPage`, `DevicesPage`...), [`components`]: shared pieces.
//! - [`error`]: [`ApiError`](error::ApiError), the one error contract of the server functions.
//!
//! Built twice: with `ssr` into the server (rendering and server-function bodies) and with `hydrate` into
//! the wasm bundle (`frontend`), which takes over the server-rendered page.

pub mod api;
pub mod browser;
pub mod components;
pub mod error;
pub mod pages;

use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::components::{ParentRoute, Redirect, Route, Router, Routes};
use leptos_router::{SsrMode, path};

use pages::{
    AuditPage, DevicePage, DevicesPage, GroupPage, GroupsPage, Layout, LoginPage, NewTaskPage,
    NotFound, PackagePage, PackagesPage, ProductsPage, ReferencePage, SettingsPage, TaskPage,
    TasksPage,
};

/// The HTML document around [`App`].
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <meta name="color-scheme" content="light" />
                <link rel="icon" type="image/svg+xml" href="/pkg/favicon.svg" />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The console's router. Pages render in `Async` mode: the server waits for a page's data and sends it
/// whole, so it reads complete without JavaScript (out-of-order streaming would need a script to place it).
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    view! {
        <Stylesheet id="updraft" href="/pkg/updraft.css" />
        <Title formatter=|page: String| if page.is_empty() { "Updraft".to_owned() } else { format!("{page} · Updraft") } />
        <Router>
            <Routes fallback=NotFound>
                <Route path=path!("/login") view=LoginPage ssr=SsrMode::Async />
                <ParentRoute path=path!("") view=Layout ssr=SsrMode::Async>
                    <Route path=path!("") view=|| view! { <Redirect path="/devices" /> } />
                    <Route path=path!("devices") view=DevicesPage ssr=SsrMode::Async />
                    <Route path=path!("devices/:id") view=DevicePage ssr=SsrMode::Async />
                    <Route path=path!("groups") view=GroupsPage ssr=SsrMode::Async />
                    <Route path=path!("groups/:id") view=GroupPage ssr=SsrMode::Async />
                    <Route path=path!("products") view=ProductsPage ssr=SsrMode::Async />
                    <Route path=path!("upgrades") view=TasksPage ssr=SsrMode::Async />
                    <Route path=path!("upgrades/new") view=NewTaskPage ssr=SsrMode::Async />
                    <Route path=path!("upgrades/tasks/:id") view=TaskPage ssr=SsrMode::Async />
                    <Route path=path!("upgrades/packages") view=PackagesPage ssr=SsrMode::Async />
                    <Route path=path!("upgrades/packages/:id") view=PackagePage ssr=SsrMode::Async />
                    <Route path=path!("settings") view=SettingsPage ssr=SsrMode::Async />
                    <Route path=path!("settings/audit") view=AuditPage ssr=SsrMode::Async />
                    <Route path=path!("api-reference") view=ReferencePage ssr=SsrMode::Async />
                </ParentRoute>
            </Routes>
        </Router>
    }
}
