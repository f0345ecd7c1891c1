//! `/upgrades`: Software/Firmware Upgrades, the packages and the upgrade tasks.

use leptos::prelude::*;
use leptos_meta::Title;

use crate::api::upgrades::{list_packages, list_tasks};
use crate::components::StatusBadge;

/// `/upgrades`
#[component]
pub fn UpgradesPage() -> impl IntoView {
    let packages = Resource::new(|| (), |()| list_packages(0));
    let tasks = Resource::new(|| (), |()| list_tasks(0));
    view! {
        <Title text="Software/Firmware Upgrades" />
        <div class="page-head"><h1>"Software/Firmware Upgrades"</h1></div>
        <section>
            <h2>"Upgrade tasks"</h2>
            <Transition fallback=|| view! { <p class="muted">"Loading tasks…"</p> }>
                {move || tasks.get().map(|r| match r {
                    Ok(page) if page.items.is_empty() => view! { <p class="empty">"No upgrade tasks."</p> }.into_any(),
                    Ok(page) => view! {
                        <table class="table" id="tasks">
                            <thead><tr><th>"Name"</th><th>"Type"</th><th>"Status"</th><th>"Progress"</th><th>"Created"</th></tr></thead>
                            <tbody>
                                {page.items.into_iter().map(|t| {
                                    let done = t.success + t.fail;
                                    let pct = if t.total > 0 { done * 100 / t.total } else { 0 };
                                    view! {
                                        <tr>
                                            <td>{t.task_name}</td><td>{t.task_type}</td><td><StatusBadge status=t.status /></td>
                                            <td><progress max="100" value=pct></progress>{format!(" {done}/{}", t.total)}</td>
                                            <td class="muted">{t.created}</td>
                                        </tr>
                                    }
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any(),
                    Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                })}
            </Transition>
        </section>
        <section>
            <h2>"Packages"</h2>
            <Transition fallback=|| view! { <p class="muted">"Loading packages…"</p> }>
                {move || packages.get().map(|r| match r {
                    Ok(page) if page.items.is_empty() => view! { <p class="empty">"No packages."</p> }.into_any(),
                    Ok(page) => view! {
                        <table class="table" id="packages">
                            <thead><tr><th>"Version"</th><th>"Type"</th><th>"Product"</th><th>"File"</th><th>"Size"</th><th>"Uploaded"</th></tr></thead>
                            <tbody>
                                {page.items.into_iter().map(|p| view! {
                                    <tr>
                                        <td>{p.version}</td><td>{p.package_type}</td><td class="mono">{p.product_id}</td>
                                        <td>{p.file_name}</td><td class="num">{human_size(p.size)}</td><td class="muted">{p.created}</td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any(),
                    Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                })}
            </Transition>
        </section>
    }
}

/// `1536` → `1.5 KiB`.
fn human_size(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes.max(0) as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_human() {
        assert_eq!(super::human_size(512), "512 B");
        assert_eq!(super::human_size(1536), "1.5 KiB");
        assert_eq!(super::human_size(256 * 1024 * 1024), "256.0 MiB");
    }
}
