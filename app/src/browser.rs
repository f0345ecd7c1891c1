//! What only a browser can do, behind signals the pages use the same way on the server and in the
//! browser: the live event stream (with a periodic refresh when it drops), uploads with progress, and
//! reading a chosen file. On the server (and before hydration) these are inert.

use leptos::prelude::*;

/// The state of a page's live connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    /// Not connected yet (also: rendered on the server).
    Connecting,
    /// Events arrive as they happen.
    Streaming,
    /// The stream dropped; the page refreshes every few seconds while it reconnects.
    Polling,
}

impl Live {
    /// The indicator's text.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Connecting => "Connecting…",
            Self::Streaming => "Live",
            Self::Polling => "Reconnecting; refreshing every 5 s",
        }
    }
}

/// How often a page refetches while its event stream is down.
pub const POLL_EVERY_MS: u64 = 5_000;

/// A counter that grows whenever the page should refetch: at most once a second while task events arrive
/// on `GET /events` (one task's, or all of the project's), and every [`POLL_EVERY_MS`] while the stream is
/// down. Also returns the connection state for an indicator.
/// The stream follows `task_id` (reconnecting when it changes, closing when the page goes away).
pub fn live_updates(
    task_id: impl Fn() -> Option<String> + Send + Sync + 'static,
) -> (ReadSignal<u64>, ReadSignal<Live>) {
    let (tick, set_tick) = signal(0_u64);
    let (state, set_state) = signal(Live::Connecting);
    #[cfg(feature = "hydrate")]
    Effect::new(move |_| imp::connect(task_id(), set_tick, state, set_state));
    #[cfg(not(feature = "hydrate"))]
    let _ = (task_id, set_tick, set_state);
    (tick, state)
}

/// An upload's progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upload {
    /// Nothing sent yet.
    Idle,
    /// Bytes sent of bytes in all.
    Sending {
        /// Sent.
        sent: u64,
        /// In all.
        total: u64,
    },
    /// The server answered (status, body).
    Done {
        /// HTTP status.
        status: u16,
        /// The body (JSON).
        body: String,
    },
    /// The connection failed or was cancelled.
    Failed(String),
}

/// Posts `form` as `multipart/form-data` to `url`, reporting progress in `progress`. Returns a handle
/// whose [`UploadHandle::cancel`] aborts the upload.
#[cfg(feature = "hydrate")]
pub fn upload(
    form: &web_sys::HtmlFormElement,
    url: &str,
    progress: WriteSignal<Upload>,
) -> Result<UploadHandle, String> {
    imp::upload(form, url, progress)
}

/// A running upload. Dropping it (leaving the page) aborts the upload, so no callback outlives it.
#[cfg(feature = "hydrate")]
pub struct UploadHandle {
    xhr: web_sys::XmlHttpRequest,
    _callbacks: Vec<wasm_bindgen::closure::Closure<dyn FnMut(web_sys::ProgressEvent)>>,
}

#[cfg(feature = "hydrate")]
impl UploadHandle {
    /// Aborts the upload; the server discards what it received.
    pub fn cancel(&self) {
        let _ = self.xhr.abort();
    }
}

#[cfg(feature = "hydrate")]
impl Drop for UploadHandle {
    fn drop(&mut self) {
        self.xhr.set_onload(None);
        self.xhr.set_onerror(None);
        self.xhr.set_onabort(None);
        if let Ok(upload) = self.xhr.upload() {
            upload.set_onprogress(None);
        }
        // A finished request ignores this.
        let _ = self.xhr.abort();
    }
}

/// Reads the first file chosen in `input` as text into `into`.
#[cfg(feature = "hydrate")]
pub fn read_file(input: &web_sys::HtmlInputElement, into: WriteSignal<String>) {
    use wasm_bindgen::JsCast;
    let Some(file) = input.files().and_then(|f| f.get(0)) else {
        return;
    };
    wasm_bindgen_futures::spawn_local(async move {
        if let Ok(text) = wasm_bindgen_futures::JsFuture::from(file.text()).await
            && let Some(text) = text.dyn_ref::<js_sys::JsString>()
        {
            into.set(String::from(text));
        }
    });
}

/// Minutes the browser's time zone is west of UTC at the local time `local` (a `datetime-local` value;
/// now, if it is not one), as JavaScript's `getTimezoneOffset()` says: daylight saving time is that of
/// the chosen date. 0 (UTC) on the server.
#[must_use]
pub fn timezone_offset_minutes(local: &str) -> i64 {
    #[cfg(feature = "hydrate")]
    {
        let at = js_sys::Date::new(&wasm_bindgen::JsValue::from_str(local));
        let at = if at.get_time().is_nan() {
            js_sys::Date::new_0()
        } else {
            at
        };
        #[allow(clippy::cast_possible_truncation)]
        let minutes = at.get_timezone_offset() as i64;
        minutes
    }
    #[cfg(not(feature = "hydrate"))]
    {
        let _ = local;
        0
    }
}

#[cfg(feature = "hydrate")]
mod imp {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use leptos::prelude::*;
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;

    use super::{Live, POLL_EVERY_MS, Upload, UploadHandle};

    /// The stream and its listeners, dropped together when the page goes away.
    struct Stream {
        source: web_sys::EventSource,
        _listeners: Vec<Closure<dyn FnMut(web_sys::Event)>>,
    }

    pub(super) fn connect(
        task_id: Option<String>,
        set_tick: WriteSignal<u64>,
        state: ReadSignal<Live>,
        set_state: WriteSignal<Live>,
    ) {
        let url = match &task_id {
            Some(t) => format!("/events?task_id={}", js_sys::encode_uri_component(t)),
            None => "/events".to_owned(),
        };
        let Ok(source) = web_sys::EventSource::new(&url) else {
            set_state.set(Live::Polling);
            return;
        };
        let dirty = Rc::new(Cell::new(false));
        let mut listeners = Vec::new();
        for kind in ["task.changed", "subtask.changed", "resync"] {
            let dirty = dirty.clone();
            let listener = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| dirty.set(true));
            let _ =
                source.add_event_listener_with_callback(kind, listener.as_ref().unchecked_ref());
            listeners.push(listener);
        }
        let reopened = Cell::new(false);
        let opened = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
            set_state.set(Live::Streaming);
            // After a reconnection anything may have changed; the first opening follows the page's load.
            if reopened.replace(true) {
                set_tick.update(|t| *t += 1);
            }
        });
        source.set_onopen(Some(opened.as_ref().unchecked_ref()));
        listeners.push(opened);
        let failed =
            Closure::<dyn FnMut(web_sys::Event)>::new(move |_| set_state.set(Live::Polling));
        source.set_onerror(Some(failed.as_ref().unchecked_ref()));
        listeners.push(failed);
        let stream = StoredValue::new_local(Some(Stream {
            source,
            _listeners: listeners,
        }));

        let since_poll = Rc::new(Cell::new(0_u64));
        let interval = set_interval_with_handle(
            move || {
                let streaming = state.get_untracked() == Live::Streaming;
                if dirty.replace(false) {
                    set_tick.update(|t| *t += 1);
                    since_poll.set(0);
                } else if !streaming {
                    since_poll.set(since_poll.get() + 1_000);
                    if since_poll.get() >= POLL_EVERY_MS {
                        since_poll.set(0);
                        set_tick.update(|t| *t += 1);
                    }
                }
            },
            Duration::from_secs(1),
        )
        .ok();
        on_cleanup(move || {
            if let Some(i) = interval {
                i.clear();
            }
            stream.update_value(|s| {
                if let Some(s) = s.take() {
                    s.source.close();
                }
            });
        });
    }

    pub(super) fn upload(
        form: &web_sys::HtmlFormElement,
        url: &str,
        progress: WriteSignal<Upload>,
    ) -> Result<UploadHandle, String> {
        let js = |e: wasm_bindgen::JsValue| format!("{e:?}");
        let data = web_sys::FormData::new_with_form(form).map_err(js)?;
        let xhr = web_sys::XmlHttpRequest::new().map_err(js)?;
        xhr.open_with_async("POST", url, true).map_err(js)?;
        xhr.set_request_header("Accept", "application/json")
            .map_err(js)?;
        let on_progress =
            Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |e: web_sys::ProgressEvent| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                progress.set(Upload::Sending {
                    sent: e.loaded() as u64,
                    total: e.total() as u64,
                });
            });
        xhr.upload()
            .map_err(js)?
            .set_onprogress(Some(on_progress.as_ref().unchecked_ref()));
        let done_xhr = xhr.clone();
        let on_load = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |_| {
            progress.set(Upload::Done {
                status: done_xhr.status().unwrap_or(0),
                body: done_xhr.response_text().ok().flatten().unwrap_or_default(),
            });
        });
        xhr.set_onload(Some(on_load.as_ref().unchecked_ref()));
        let on_error = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |_| {
            progress.set(Upload::Failed(
                "the connection failed; nothing was stored".to_owned(),
            ));
        });
        xhr.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let on_abort = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |_| {
            progress.set(Upload::Failed(
                "upload cancelled; nothing was stored".to_owned(),
            ));
        });
        xhr.set_onabort(Some(on_abort.as_ref().unchecked_ref()));
        progress.set(Upload::Sending { sent: 0, total: 0 });
        xhr.send_with_opt_form_data(Some(&data)).map_err(js)?;
        Ok(UploadHandle {
            xhr,
            _callbacks: vec![on_progress, on_load, on_error, on_abort],
        })
    }
}
