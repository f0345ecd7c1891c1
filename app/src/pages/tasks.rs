//! Software/Firmware Upgrades > Tasks: `/upgrades` (the task list), `/upgrades/new` (create a task),
//! `/upgrades/tasks/:id` (counters, per-device table, step history, stop, retry, delete). The list and the
//! detail follow the task driver's events live (`crate::browser::live_updates`).

use std::collections::BTreeSet;

use leptos::prelude::*;
use leptos_meta::Title;
use leptos_router::components::A;
use leptos_router::hooks::{use_navigate, use_params_map, use_query_map};

use crate::api::groups::list_groups;
use crate::api::upgrades::{
    ConfirmTask, CreateTask, DeleteTask, RetryTask, StopTask, TaskRow, list_packages, list_tasks,
    step_history, target_count, task_detail,
};
use crate::browser::live_updates;
use crate::components::{
    FieldError, FormError, LiveIndicator, Pager, Progress, SelectAll, SelectBox, StatusBadge,
    encode, or_dash,
};

/// `/upgrades`: every task, newest first, live.
#[component]
pub fn TasksPage() -> impl IntoView {
    let offset = crate::components::use_offset();
    let (tick, live) = live_updates(|| None);
    let tasks = Resource::new(
        move || (offset(), tick.get()),
        |(offset, _)| list_tasks(offset),
    );
    view! {
        <Title text="Upgrade tasks" />
        <div class="page-head">
            <h1>"Upgrade tasks"</h1>
            <div class="buttons">
                <LiveIndicator state=live />
                <a class="button primary" href="/upgrades/new" id="create-task">"Create upgrade task"</a>
            </div>
        </div>
        <Transition fallback=|| view! { <p class="muted">"Loading tasks…"</p> }>
            {move || tasks.get().map(|r| match r {
                Ok(page) if page.items.is_empty() => view! {
                    <p class="empty">"No upgrade tasks yet. " <a href="/upgrades/packages">"Upload a package"</a>", then create a task."</p>
                }.into_any(),
                Ok(page) => {
                    let (total, offset, limit) = (page.total, page.offset, page.limit);
                    view! {
                        <table class="table" id="tasks">
                            <thead><tr><th>"Name"</th><th>"Type"</th><th>"Status"</th><th>"Progress"</th><th class="num">"Succeeded"</th><th class="num">"Failed"</th><th>"Created"</th></tr></thead>
                            <tbody>
                                {page.items.into_iter().map(|t| view! {
                                    <tr>
                                        <td><a href=format!("/upgrades/tasks/{}", t.task_id)>{t.task_name.clone()}</a></td>
                                        <td>{task_kind(&t.task_type)}</td>
                                        <td><StatusBadge status=t.status.clone() /></td>
                                        <td><Progress done=t.done() total=t.total /></td>
                                        <td class="num">{t.success}</td>
                                        <td class="num">{t.fail}</td>
                                        <td class="muted">{t.scheduled.clone().map_or(t.created.clone(), |s| format!("{} (starts {s})", t.created))}</td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                        <Pager total offset limit base="/upgrades" />
                    }.into_any()
                }
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
            })}
        </Transition>
    }
}

pub(crate) fn task_kind(task_type: &str) -> &'static str {
    if task_type == "firmwareUpgrade" {
        "Firmware"
    } else {
        "Software"
    }
}

/// `/upgrades/new`: the create-task form.
#[component]
pub fn NewTaskPage() -> impl IntoView {
    let query = use_query_map();
    let create = ServerAction::<CreateTask>::new();
    let packages = Resource::new(|| (), |()| list_packages(0));
    let groups = Resource::new(|| (), |()| list_groups());
    let error = Signal::derive(move || create.value().get().and_then(Result::err));
    let (package, set_package) = signal(query.get_untracked().get("package").unwrap_or_default());
    let (targets, set_targets) = signal("group".to_owned());
    let (group, set_group) = signal(String::new());
    let (device_ids, set_device_ids) = signal(String::new());
    let (later, set_later) = signal(false);
    let (retry, set_retry) = signal(false);
    let (schedule_at, set_schedule_at) = signal(String::new());
    let tz_offset = move || crate::browser::timezone_offset_minutes(&schedule_at.get());
    let group_count = Resource::new(
        move || (package.get(), group.get()),
        |(package, group)| async move {
            if package.is_empty() || group.is_empty() {
                return None;
            }
            target_count(package, group).await.ok()
        },
    );
    let navigate = use_navigate();
    Effect::new(move |_| {
        if let Some(Ok(id)) = create.value().get() {
            navigate(&format!("/upgrades/tasks/{id}"), Default::default());
        }
    });
    view! {
        <Title text="Create upgrade task" />
        <A href="/upgrades" attr:class="crumb">"Upgrade tasks"</A>
        <div class="page-head"><h1>"Create upgrade task"</h1></div>
        <ActionForm action=create attr:id="task-form" attr:class="stack">
            <section class="card">
                <h2>"Basic information"</h2>
                <div class="form-grid">
                    <label>
                        "Task name"
                        <input name="task_name" required maxlength="128" pattern="[A-Za-z0-9_\u{4e00}-\u{9fff}]+" placeholder="meters_v2_rollout" />
                        <span class="hint">"Letters, digits and _"</span>
                        <FieldError error field="task_name" />
                    </label>
                    <fieldset>
                        <legend>"Execution time"</legend>
                        <label class="inline"><input type="radio" name="start" value="now" checked on:change=move |_| set_later.set(false) />"Now"</label>
                        <label class="inline"><input type="radio" name="start" value="later" on:change=move |_| set_later.set(true) />"Scheduled"</label>
                        <input type="datetime-local" name="schedule_time" aria-label="Start at" disabled=move || !later.get() required=later
                            on:input=move |ev| set_schedule_at.set(event_target_value(&ev)) />
                        <input type="hidden" name="tz_offset" prop:value=move || tz_offset().to_string() />
                        <span class="hint">"Your local time (UTC without JavaScript); at most 7 days ahead"</span>
                        <FieldError error field="schedule_time" />
                        <label class="inline"><input type="checkbox" name="need_confirm" value="on" id="need-confirm" />"Wait for my confirmation"</label>
                        <span class="hint">"Devices start only when you confirm them on the task's page"</span>
                    </fieldset>
                    <fieldset>
                        <legend>"Retry policy"</legend>
                        <label class="inline"><input type="checkbox" name="retry" value="on" on:change=move |ev| set_retry.set(event_target_checked(&ev)) />"Retry failed devices"</label>
                        <div class="row" hidden=move || !retry.get()>
                            <label>"Attempts" <input name="retry_count" type="number" min="1" max="5" value="2" /></label>
                            <label>"Every (minutes)" <input name="retry_interval" type="number" min="5" max="1440" value="5" /></label>
                        </div>
                        <FieldError error field="retry_count" />
                        <FieldError error field="retry_interval" />
                    </fieldset>
                </div>
            </section>
            <section class="card">
                <h2>"Package"</h2>
                <Transition fallback=|| view! { <p class="muted">"Loading packages…"</p> }>
                    {move || packages.get().map(|r| match r {
                        Ok(page) if page.items.is_empty() => view! {
                            <p class="empty">"No packages. " <a href="/upgrades/packages">"Upload one first."</a></p>
                        }.into_any(),
                        Ok(page) => view! {
                            <label>
                                "Package"
                                <select name="package_id" required on:change=move |ev| set_package.set(event_target_value(&ev))>
                                    <option value="">"Choose a package…"</option>
                                    {page.items.into_iter().map(|p| {
                                        let id = p.package_id.clone();
                                        view! {
                                            <option value=p.package_id.clone() selected=move || package.get() == id>
                                                {format!("{} {} · {} · {}", super::packages::kind(&p.package_type), p.version, p.product_name, p.file_name)}
                                            </option>
                                        }
                                    }).collect_view()}
                                </select>
                            </label>
                        }.into_any(),
                        Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                    })}
                </Transition>
                <FieldError error field="package_id" />
            </section>
            <section class="card">
                <h2>"Devices"</h2>
                <div class="choice">
                    <label class="inline"><input type="radio" name="targets" value="group" checked on:change=move |_| set_targets.set("group".into()) />"A group"</label>
                    <label class="inline"><input type="radio" name="targets" value="devices" on:change=move |_| set_targets.set("devices".into()) />"Devices by id"</label>
                </div>
                <div class="form-grid">
                    <label hidden=move || targets.get() != "group">
                        "Group"
                        <select name="group_id" on:change=move |ev| set_group.set(event_target_value(&ev))>
                            <option value="">"Choose a group…"</option>
                            <Transition fallback=|| ()>
                                {move || groups.get().and_then(Result::ok).map(|page| page.items.into_iter().map(|g| view! {
                                    <option value=g.group_id.clone()>{format!("{} ({} devices)", g.name, g.members)}</option>
                                }).collect_view())}
                            </Transition>
                        </select>
                        <FieldError error field="group_id" />
                    </label>
                    <label class="wide" hidden=move || targets.get() != "devices">
                        "Device ids " <span class="muted">"(one per line, or separated by commas)"</span>
                        <textarea name="device_ids" rows="4" on:input=move |ev| set_device_ids.set(event_target_value(&ev))></textarea>
                        <FieldError error field="device_ids" />
                    </label>
                </div>
                <p class="target-count" id="target-count">
                    {move || if targets.get() == "devices" {
                        let n = crate::api::parse_ids(&device_ids.get()).len();
                        format!("{n} devices will be upgraded.")
                    } else {
                        match group_count.get().flatten() {
                            Some(n) => format!("{n} devices of the package's product are in this group now."),
                            None => "Choose a package and a group to see how many devices they reach.".to_owned(),
                        }
                    }}
                </p>
            </section>
            <super::rollout::RolloutFields error />
            <FormError error />
            <div class="actions">
                <button type="submit" class="primary" disabled=move || create.pending().get()>
                    {move || if create.pending().get() { "Creating…" } else { "Create now" }}
                </button>
                <a class="button" href="/upgrades">"Cancel"</a>
            </div>
        </ActionForm>
    }
}

/// `/upgrades/tasks/:id?status=&offset=&device=`
#[component]
pub fn TaskPage() -> impl IntoView {
    let params = use_params_map();
    let query = use_query_map();
    let id = move || params.read().get("id").unwrap_or_default();
    let param = move |k: &str| query.read().get(k).unwrap_or_default();
    let stop = ServerAction::<StopTask>::new();
    let retry = ServerAction::<RetryTask>::new();
    let delete = ServerAction::<DeleteTask>::new();
    let resume = ServerAction::<crate::api::rollouts::ResumeTask>::new();
    let confirm = ServerAction::<ConfirmTask>::new();
    let (tick, live) = live_updates(move || params.read().get("id"));
    let commands = move || {
        (
            stop.version().get(),
            retry.version().get(),
            resume.version().get(),
            confirm.version().get(),
        )
    };
    let detail = Resource::new(
        move || {
            (
                id(),
                param("status"),
                param("offset").parse::<u64>().unwrap_or(0),
                tick.get(),
                commands(),
            )
        },
        |(id, status, offset, _, _)| task_detail(id, status, offset),
    );
    let history = Resource::new(
        move || (id(), param("device"), tick.get()),
        |(id, device, _)| async move {
            if device.is_empty() {
                None
            } else {
                Some(step_history(id, device).await)
            }
        },
    );
    let selected = RwSignal::new(BTreeSet::<String>::new());
    Effect::new(move |_| {
        if matches!(stop.value().get(), Some(Ok(_))) || matches!(retry.value().get(), Some(Ok(_))) {
            selected.set(BTreeSet::new());
        }
    });
    let navigate = use_navigate();
    Effect::new(move |_| {
        if matches!(delete.value().get(), Some(Ok(()))) {
            navigate("/upgrades", Default::default());
        }
    });
    // The outcome of the latest stop or retry, whichever came last.
    let (last_command, set_last_command) = signal(None);
    Effect::new(move |_| {
        if let Some(r) = stop.value().get() {
            set_last_command.set(Some(r));
        }
    });
    Effect::new(move |_| {
        if let Some(r) = retry.value().get() {
            set_last_command.set(Some(r));
        }
    });
    Effect::new(move |_| {
        if let Some(r) = confirm.value().get() {
            set_last_command.set(Some(r));
        }
    });
    let command_message = move || {
        Some(match last_command.get()? {
            Ok(r) if r.refused.is_empty() => view! { <p class="alert ok" role="status" id="command-result">"Done."</p> }.into_any(),
            Ok(r) => view! { <p class="alert error" role="alert" id="command-result">{r.refused.join("; ")}</p> }.into_any(),
            Err(e) => view! { <p class="alert error" role="alert" id="command-result">{e.message}</p> }.into_any(),
        })
    };
    let selection = move || selected.get().into_iter().collect::<Vec<_>>().join(",");
    view! {
        <Title text="Upgrade task" />
        <A href="/upgrades" attr:class="crumb">"Upgrade tasks"</A>
        <Transition fallback=|| view! { <p class="muted">"Loading task…"</p> }>
            {move || detail.get().map(|r| match r {
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                Ok(d) => {
                    let t = d.task.clone();
                    let task_id = t.task_id.clone();
                    let (task_id2, task_id3) = (task_id.clone(), task_id.clone());
                    let (stop_id, retry_id, confirm_id) = (task_id.clone(), task_id.clone(), task_id.clone());
                    let delete_id = task_id;
                    let ids: Vec<String> = d.devices.items.iter().map(|s| s.device_id.clone()).collect();
                    let status_filter = param("status");
                    let base = format!("/upgrades/tasks/{}?status={}", t.task_id, encode(&status_filter));
                    let (total, offset, limit) = (d.devices.total, d.devices.offset, d.devices.limit);
                    view! {
                        <div class="page-head">
                            <div class="title-line">
                                <h1 id="task-name">{t.task_name.clone()}</h1>
                                <StatusBadge status=t.status.clone() />
                            </div>
                            <div class="buttons">
                                <LiveIndicator state=live />
                                <ActionForm action=stop>
                                    <input type="hidden" name="task_id" value=stop_id.clone() />
                                    <input type="hidden" name="device_ids" value="" />
                                    <button type="submit" id="stop-task">"Stop task"</button>
                                </ActionForm>
                                <ActionForm action=retry>
                                    <input type="hidden" name="task_id" value=retry_id.clone() />
                                    <input type="hidden" name="device_ids" value="" />
                                    <button type="submit" id="retry-task">"Retry failed"</button>
                                </ActionForm>
                                {(d.unconfirmed > 0).then(|| view! {
                                    <ActionForm action=confirm>
                                        <input type="hidden" name="task_id" value=confirm_id.clone() />
                                        <input type="hidden" name="device_ids" value="" />
                                        <button type="submit" class="primary" id="confirm-task">
                                            {format!("Confirm {} waiting device{}", d.unconfirmed, if d.unconfirmed == 1 { "" } else { "s" })}
                                        </button>
                                    </ActionForm>
                                })}
                                <ActionForm action=delete>
                                    <input type="hidden" name="task_id" value=delete_id.clone() />
                                    <button type="submit" class="danger" id="delete-task">"Delete"</button>
                                </ActionForm>
                            </div>
                        </div>
                        {move || delete.value().get().and_then(Result::err).map(|e| view! { <p class="alert error" role="alert" id="delete-error">{e.message}</p> })}
                        {command_message}
                        {(!t.status_desc.is_empty()).then(|| view! { <p class="muted">{t.status_desc.clone()}</p> })}
                        <section class="card">
                            <div class="task-summary">
                                <Progress done=t.done() total=t.total />
                                <dl class="facts compact">
                                    <dt>"Type"</dt><dd>{task_kind(&t.task_type)}</dd>
                                    <dt>"Package"</dt><dd>{d.package_id.clone().map_or_else(|| view! { <span class="muted">"deleted"</span> }.into_any(), |p| view! { <a href=format!("/upgrades/packages/{p}")>{p.clone()}</a> }.into_any())}</dd>
                                    <dt>"Retry"</dt><dd>{if d.retry_count > 0 { format!("{} attempts, every {} min", d.retry_count, d.retry_interval) } else { "off".to_owned() }}</dd>
                                    <dt>"Created"</dt><dd>{t.created.clone()}</dd>
                                    <dt>"Starts"</dt><dd>{or_dash(t.scheduled.clone())}</dd>
                                    <dt>"Finished"</dt><dd>{or_dash(t.finished.clone())}</dd>
                                    <dt>"History"</dt><dd><a id="task-audit" href=format!("/settings/audit?resource_type=batchtasks&resource_id={}", encode(&t.task_id))>"Audit log"</a></dd>
                                </dl>
                            </div>
                            <Counters t=t.clone() id=task_id3 current=status_filter />
                        </section>
                        {d.rollout.clone().map(|card| view! { <super::rollout::RolloutPanel card task_id=t.task_id.clone() resume /> })}
                        <div class="page-head">
                            <h2>"Devices"</h2>
                            <div class="buttons">
                                <button
                                    id="stop-selected"
                                    disabled=move || selected.read().is_empty()
                                    on:click={
                                        let task_id = task_id2.clone();
                                        move |_| { stop.dispatch(StopTask { task_id: task_id.clone(), device_ids: selection() }); }
                                    }
                                >
                                    {move || format!("Stop {} selected", selected.read().len())}
                                </button>
                                <button
                                    id="retry-selected"
                                    disabled=move || selected.read().is_empty()
                                    on:click={
                                        let task_id = task_id2.clone();
                                        move |_| { retry.dispatch(RetryTask { task_id: task_id.clone(), device_ids: selection() }); }
                                    }
                                >
                                    {move || format!("Retry {} selected", selected.read().len())}
                                </button>
                            </div>
                        </div>
                        {if d.devices.items.is_empty() {
                            view! { <p class="empty">"No devices in this status."</p> }.into_any()
                        } else {
                            view! {
                                <div class="table-wrap">
                                <table class="table" id="task-devices">
                                    <thead><tr><th class="check"><SelectAll selected ids /></th><th>"Device"</th><th>"Status"</th><th>"Step"</th><th>"Progress"</th><th class="num">"Attempts"</th><th>"Error"</th><th>"Started"</th><th>"Updated"</th><th>"Finished"</th></tr></thead>
                                    <tbody>
                                        {d.devices.items.into_iter().map(|s| {
                                            let history = format!("/upgrades/tasks/{}?status={}&offset={}&device={}", t.task_id, encode(&param("status")), offset, encode(&s.device_id));
                                            view! {
                                                <tr data-device=s.device_id.clone()>
                                                    <td class="check"><SelectBox selected id=s.device_id.clone() /></td>
                                                    <td class="mono"><a href=history title="Step history">{s.device_id.clone()}</a></td>
                                                    <td><StatusBadge status=s.status /></td>
                                                    <td>{s.step}</td>
                                                    <td><progress max="100" value=s.progress></progress>" "<span class="num">{format!("{}%", s.progress)}</span></td>
                                                    <td class="num">{s.attempts}</td>
                                                    <td class="error-text">{or_dash(s.error)}</td>
                                                    <td class="muted">{or_dash(s.started)}</td>
                                                    <td class="muted">{s.updated}</td>
                                                    <td class="muted">{or_dash(s.finished)}</td>
                                                </tr>
                                            }
                                        }).collect_view()}
                                    </tbody>
                                </table>
                                </div>
                                <Pager total offset limit base />
                            }.into_any()
                        }}
                    }.into_any()
                }
            })}
        </Transition>
        <Transition fallback=|| ()>
            {move || history.get().flatten().map(|r| match r {
                Err(e) => view! { <p class="alert error">{e.message}</p> }.into_any(),
                Ok(steps) => view! {
                    <section class="card" id="history">
                        <div class="page-head">
                            <h2>{format!("Step history of {}", param("device"))}</h2>
                            <a href=format!("/devices/{}", param("device"))>"Device details"</a>
                        </div>
                        <ol class="timeline">
                            {steps.into_iter().map(|s| view! {
                                <li>
                                    <span class="muted">{s.at}</span>" "
                                    <StatusBadge status=s.status />" "
                                    <strong>{s.step}</strong>
                                    {format!(" {}%", s.progress)}
                                    {(!s.detail.is_empty()).then(|| view! { <span class="muted">{format!(" · {}", s.detail)}</span> })}
                                </li>
                            }).collect_view()}
                        </ol>
                    </section>
                }.into_any(),
            })}
        </Transition>
    }
}

/// The counters, each a filter link.
#[component]
fn Counters(t: TaskRow, id: String, current: String) -> impl IntoView {
    let counters = [
        ("", "All", t.total),
        ("Waitting", "Waiting", t.waiting),
        ("Processing", "Running", t.processing),
        ("Success", "Succeeded", t.success),
        ("Fail", "Failed", t.fail),
        ("FailWaitRetry", "Retrying", t.fail_wait_retry),
        ("Stopped", "Stopped", t.stopped),
    ];
    view! {
        <nav class="counters" aria-label="Filter devices by status" id="counters">
            {counters.into_iter().map(|(status, label, n)| view! {
                <a
                    class=if current == status { "counter on" } else { "counter" }
                    href=format!("/upgrades/tasks/{id}?status={status}")
                    data-status=status
                >
                    <span class="n">{n}</span>
                    <span class="label">{label}</span>
                </a>
            }).collect_view()}
        </nav>
    }
}
