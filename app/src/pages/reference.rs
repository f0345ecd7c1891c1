//! `/api-reference`: the application API, read from the OpenAPI document the server generates from its
//! handlers (the same one served at `/v5/openapi.json`).

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::reference::api_reference;

/// `/api-reference`
#[component]
pub fn ReferencePage() -> impl IntoView {
    let reference = Resource::new(|| (), |()| api_reference());
    view! {
        <Title text="API reference" />
        <Transition fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || reference.get().map(|r| match r {
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                Ok(r) => view! {
                    <div class="page-head">
                        <h1>{r.title.clone()}</h1>
                        <a class="button" href="/v5/openapi.json" id="openapi-link">"OpenAPI 3.1 document"</a>
                    </div>
                    <p class="muted">{format!("Version {}. ", r.version)}{r.description.clone()}</p>
                    <nav class="toc" aria-label="Sections">
                        {r.sections.iter().map(|s| view! { <a href=format!("#{}", s.name)>{s.name.clone()}</a> }).collect_view()}
                    </nav>
                    {r.sections.into_iter().map(|s| view! {
                        <section class="card reference" id=s.name.clone()>
                            <h2>{s.name.clone()}</h2>
                            <p class="muted">{s.description}</p>
                            {s.operations.into_iter().map(|op| view! { <OperationView op /> }).collect_view()}
                        </section>
                    }).collect_view()}
                }.into_any(),
            })}
        </Transition>
    }
}

/// One operation, folded.
#[component]
fn OperationView(op: crate::api::reference::Operation) -> impl IntoView {
    view! {
        <details class="operation">
            <summary>
                <span class=format!("method {}", op.method.to_lowercase())>{op.method.clone()}</span>
                " " <code>{op.path.clone()}</code>
                " " <span class="muted">{op.operation_id.clone()}</span>
                " " {op.summary.clone()}
            </summary>
            <div class="operation-body">
                {(!op.description.is_empty()).then(|| view! { <p class="pre">{op.description.clone()}</p> })}
                {(!op.parameters.is_empty()).then(|| view! {
                    <table class="table compact">
                        <thead><tr><th>"Parameter"</th><th>"In"</th><th>"Required"</th><th>"Meaning"</th></tr></thead>
                        <tbody>
                            {op.parameters.iter().map(|p| view! {
                                <tr><td class="mono">{p.name.clone()}</td><td>{p.location.clone()}</td><td>{if p.required { "yes" } else { "" }}</td><td>{p.description.clone()}</td></tr>
                            }).collect_view()}
                        </tbody>
                    </table>
                })}
                {(!op.request.is_empty()).then(|| view! { <p>"Body: " <code>{op.request.join(", ")}</code></p> })}
                <ul class="responses">
                    {op.responses.iter().map(|(status, d)| view! { <li><code>{status.clone()}</code>" "{d.clone()}</li> }).collect_view()}
                </ul>
            </div>
        </details>
    }
}
