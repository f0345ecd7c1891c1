//! The console's hydrate entry point, built for wasm32 and loaded by the server-rendered page.
// Leptos views are deeply nested types; the task and reference pages exceed the default limit of 128.
#![recursion_limit = "256"]

/// Takes over the server-rendered document: attaches event handlers and starts the reactive system.
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
    // For tests and scripts: the page is interactive from here on.
    if let Some(body) = leptos::prelude::document().body() {
        let _ = body.set_attribute("data-hydrated", "true");
    }
}
