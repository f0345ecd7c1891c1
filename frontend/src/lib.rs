//! The console's hydrate entry point, built for wasm32 and loaded by the server-rendered page.

/// Takes over the server-rendered document: attaches event handlers and starts the reactive system.
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
