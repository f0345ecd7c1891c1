use super::*;

const MIN: i64 = 60_000;

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn wave(size: WaveSize) -> Wave {
    Wave {
        size,
        success_threshold: DEFAULT_SUCCESS_THRESHOLD,
        ..Wave::default()
    }
}

/// 1 %, 10 %, 50 %, rest.
fn four_waves() -> Rollout {
    Rollout {
        waves: vec![
            wave(WaveSize::Percent(1)),
            wave(WaveSize::Percent(10)),
            wave(WaveSize::Percent(50)),
        ],
        ..Rollout::default()
    }
    .check(7)
    .unwrap()
}

fn counts(total: u32) -> WaveCounts {
    WaveCounts {
        total,
        pending: total,
        ..WaveCounts::default()
    }
}

/// Moves `n` devices of `c` from pending to in flight.
fn start(c: &mut WaveCounts, n: u32) {
    c.pending -= n;
    c.in_flight += n;
}

/// Finishes `n` in-flight devices of `c`, failed with `code` or succeeded.
fn finish(c: &mut WaveCounts, n: u32, code: Option<&str>) {
    c.in_flight -= n;
    if code.is_some() {
        c.failed += n;
    } else {
        c.succeeded += n;
    }
    c.recent.add(code, n);
}

#[test]
fn checking_adds_a_last_wave_for_the_rest_and_keeps_the_seed() {
    let r = four_waves();
    assert_eq!(r.waves.len(), 4);
    assert_eq!(r.waves[3].size, WaveSize::Rest);
    assert_eq!(r.seed(), 7);
    let again = r.clone().check(99).unwrap();
    assert_eq!(again, r, "checking is idempotent and keeps the stored seed");
    // Waves in JSON as the API takes them.
    let json: Rollout = serde_json::from_str(
        r#"{"waves": [{"percent": 1}, {"count": 100, "success_threshold": 90, "soak_minutes": 30},
                      {"group_ids": ["g1"], "error_threshold": {"max_failures": 2}}, {}]}"#,
    )
    .unwrap();
    assert_eq!(json.waves[1].soak, Some(Duration::from_secs(1800)));
    assert_eq!(json.waves[1].success_threshold, 90);
    assert_eq!(json.waves[2].size, WaveSize::Groups(vec!["g1".to_owned()]));
    assert_eq!(
        json.waves[2].error_threshold.as_ref().unwrap().count,
        ErrorKind::ALL
    );
    let round: Rollout = serde_json::from_str(&serde_json::to_string(&json).unwrap()).unwrap();
    assert_eq!(round, json);
}

#[test]
fn bad_policies_name_their_field() {
    let field = |json: &str| match serde_json::from_str::<Rollout>(json) {
        Ok(r) => r.check(1).unwrap_err().field,
        Err(e) => format!("json: {e}"),
    };
    assert_eq!(
        field(r#"{"waves": [{"percent": 0}]}"#),
        "rollout.waves[0].percent"
    );
    assert_eq!(
        field(r#"{"waves": [{"count": 0}]}"#),
        "rollout.waves[0].count"
    );
    assert_eq!(
        field(r#"{"waves": [{}, {"percent": 5}]}"#),
        "rollout.waves[0]"
    );
    assert_eq!(
        field(r#"{"waves": [{"percent": 5, "success_threshold": 101}]}"#),
        "rollout.waves[0].success_threshold"
    );
    assert_eq!(
        field(r#"{"error_threshold": {"min_finished": 3}}"#),
        "rollout.error_threshold"
    );
    assert_eq!(
        field(r#"{"error_threshold": {"max_failures": 1, "count": []}}"#),
        "rollout.error_threshold.count"
    );
    assert_eq!(field(r#"{"max_per_minute": 0}"#), "rollout.max_per_minute");
    assert_eq!(field(r#"{"max_in_flight": 0}"#), "rollout.max_in_flight");
    assert_eq!(
        field(
            r#"{"maintenance_windows": [{"start": "01:00", "end": "02:00", "time_zone": "Nowhere"}]}"#
        ),
        "rollout.maintenance_windows[0].time_zone"
    );
    // A wave with two sizes, or a misspelt field, does not parse.
    assert!(field(r#"{"waves": [{"percent": 5, "count": 5}]}"#).starts_with("json:"));
    assert!(field(r#"{"wavez": []}"#).starts_with("json:"));
}

#[test]
fn waves_open_one_after_another_as_each_reaches_its_threshold() {
    let r = four_waves();
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    let mut state = RolloutState::default();
    let d = r.decide(&state, &c, &Starts::default(), t(0));
    assert_eq!(
        (d.state.wave, d.start),
        (0, 1),
        "only the first wave starts"
    );
    state = d.state;
    start(&mut c[0], 1);
    // Nothing more while the canary runs.
    let d = r.decide(&state, &c, &Starts::default(), t(1));
    assert_eq!(d.start, 0);
    assert_eq!(
        d.wake_at, None,
        "a device's progress wakes the driver, not a timer"
    );
    finish(&mut c[0], 1, None);
    let d = r.decide(&state, &c, &Starts::default(), t(2));
    assert_eq!((d.state.wave, d.start), (1, 10));
    state = d.state;
    start(&mut c[1], 10);
    // 9 of 10 is below 95 %: the third wave waits for the last one.
    finish(&mut c[1], 9, None);
    let d = r.decide(&state, &c, &Starts::default(), t(3));
    assert_eq!((d.state.wave, d.start), (1, 0));
    finish(&mut c[1], 1, None);
    let d = r.decide(&state, &c, &Starts::default(), t(4));
    assert_eq!((d.state.wave, d.start), (2, 50));
}

#[test]
fn a_wave_finished_below_its_success_threshold_pauses_the_task() {
    let r = four_waves();
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    let state = RolloutState {
        wave: 1,
        ..RolloutState::default()
    };
    start(&mut c[0], 1);
    finish(&mut c[0], 1, None);
    start(&mut c[1], 10);
    finish(&mut c[1], 8, None);
    finish(&mut c[1], 2, Some("UPGRADE_RESULT_TIMEOUT"));
    let d = r.decide(&state, &c, &Starts::default(), t(5));
    let pause = d.paused.expect("paused");
    assert_eq!(
        pause.reason,
        "wave 2 finished with 8 of 10 devices succeeded, below its 95% success threshold"
    );
    assert_eq!(pause.at, t(5));
    assert_eq!(d.start, 0);
    // Paused, nothing starts however long it waits.
    let later = r.decide(&d.state, &c, &Starts::default(), t(10 * MIN));
    assert_eq!((later.start, later.paused), (0, None));
}

#[test]
fn a_soak_holds_the_next_wave_after_the_threshold_is_reached() {
    let mut r = four_waves();
    r.waves[0].soak = Some(Duration::from_secs(3600));
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    start(&mut c[0], 1);
    finish(&mut c[0], 1, None);
    let d = r.decide(&RolloutState::default(), &c, &Starts::default(), t(MIN));
    assert_eq!((d.state.wave, d.start), (0, 0));
    assert_eq!(d.state.ready_at, Some(t(MIN)));
    assert_eq!(d.wake_at, Some(t(61 * MIN)));
    let d = r.decide(&d.state, &c, &Starts::default(), t(61 * MIN - 1));
    assert_eq!(
        d.start, 0,
        "the soak runs from when the threshold was reached"
    );
    let d = r.decide(&d.state, &c, &Starts::default(), t(61 * MIN));
    assert_eq!((d.state.wave, d.start, d.state.ready_at), (1, 10, None));
}

#[test]
fn error_thresholds_pause_by_count_and_by_share_counting_the_chosen_kinds() {
    let mut r = four_waves();
    r.waves[1].error_threshold = Some(ErrorThreshold {
        max_failures: Some(1),
        max_failure_percent: None,
        min_finished: 1,
        count: vec![ErrorKind::DeviceFailure],
    });
    r.error_threshold = Some(ErrorThreshold {
        max_failures: None,
        max_failure_percent: Some(20),
        min_finished: 5,
        count: ErrorKind::ALL.to_vec(),
    });
    let state = RolloutState {
        wave: 1,
        ..RolloutState::default()
    };
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    start(&mut c[0], 1);
    finish(&mut c[0], 1, None);
    start(&mut c[1], 10);
    // Timeouts are not counted by the wave's threshold; one device failure is allowed.
    finish(&mut c[1], 1, Some("DEVICE_OFFLINE_TIMEOUT"));
    finish(&mut c[1], 1, Some("DEVICE_RESULT_5"));
    assert_eq!(r.decide(&state, &c, &Starts::default(), t(1)).paused, None);
    // Two device failures: more than one allowed.
    finish(&mut c[1], 1, Some("PCP_UPGRADE_FAILED_3"));
    let d = r.decide(&state, &c, &Starts::default(), t(2));
    assert_eq!(
        d.paused.unwrap().reason,
        "wave 2 error threshold: 2 devices failed, more than the 1 allowed"
    );
    // The task's share: 1 of 4 finished is 25 %, but fewer than 5 have finished.
    let mut r = four_waves();
    r.error_threshold = Some(ErrorThreshold {
        max_failures: None,
        max_failure_percent: Some(20),
        min_finished: 5,
        count: vec![ErrorKind::Refusal, ErrorKind::Timeout],
    });
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    start(&mut c[0], 1);
    finish(&mut c[0], 1, None);
    start(&mut c[1], 10);
    finish(&mut c[1], 2, None);
    finish(&mut c[1], 1, Some("SOURCE_VERSION_NOT_SUPPORTED"));
    assert_eq!(r.decide(&state, &c, &Starts::default(), t(3)).paused, None);
    finish(&mut c[1], 1, None);
    // 1 of 5: exactly 20 %, allowed.
    assert_eq!(r.decide(&state, &c, &Starts::default(), t(4)).paused, None);
    finish(&mut c[1], 1, Some("DOWNLOAD_RESULT_TIMEOUT"));
    let d = r.decide(&state, &c, &Starts::default(), t(5));
    assert_eq!(
        d.paused.unwrap().reason,
        "task error threshold: 2 of 6 finished devices failed (33%), more than the 20% allowed"
    );
}

#[test]
fn pacing_never_starts_more_than_the_minute_or_the_flight_allows() {
    let r = Rollout {
        max_per_minute: Some(10),
        max_in_flight: Some(25),
        ..Rollout::default()
    }
    .check(1)
    .unwrap();
    let mut c = vec![counts(100)];
    let s = RolloutState::default();
    let d = r.decide(&s, &c, &Starts::default(), t(0));
    assert_eq!((d.start, d.wake_at), (10, Some(t(0))));
    start(&mut c[0], 10);
    // Ten started at 0: none more until a minute after the oldest.
    let starts = Starts {
        last_minute: 10,
        oldest: Some(t(0)),
    };
    let d = r.decide(&s, &c, &starts, t(30_000));
    assert_eq!((d.start, d.wake_at), (0, Some(t(MIN))));
    // In flight: 20 started, none finished; 5 more fit.
    start(&mut c[0], 10);
    let d = r.decide(&s, &c, &Starts::default(), t(2 * MIN));
    assert_eq!(d.start, 5);
    // Exhaustively: over a simulated hour, no 60-second window ever holds more than 10 starts.
    let mut c = vec![counts(1000)];
    let mut log: Vec<i64> = Vec::new();
    let mut finished = 0;
    let mut now = 0;
    while now < 60 * MIN {
        let recent: Vec<i64> = log.iter().copied().filter(|&s| s > now - MIN).collect();
        let starts = Starts {
            last_minute: u32::try_from(recent.len()).unwrap(),
            oldest: recent.first().map(|&s| t(s)),
        };
        let d = r.decide(&s, &c, &starts, t(now));
        start(&mut c[0], d.start);
        log.extend(std::iter::repeat_n(now, d.start as usize));
        // Devices finish 90 s after they start.
        while finished < log.len() && log[finished] + 90_000 <= now {
            finish(&mut c[0], 1, None);
            finished += 1;
        }
        now += 7_000;
    }
    for &a in &log {
        let window = log.iter().filter(|&&s| s >= a && s < a + MIN).count();
        assert!(window <= 10, "{window} starts in the minute from {a}");
    }
    assert!(
        log.len() >= 500,
        "the pace is used, not just respected: {}",
        log.len()
    );
}

#[test]
fn nothing_starts_outside_a_maintenance_window() {
    let r = Rollout {
        maintenance_windows: vec![Window {
            days: Vec::new(),
            start: "01:00".to_owned(),
            end: "05:00".to_owned(),
            time_zone: "UTC".to_owned(),
        }],
        ..Rollout::default()
    }
    .check(1)
    .unwrap();
    let c = vec![counts(10)];
    let noon = 12 * 60 * MIN;
    let d = r.decide(&RolloutState::default(), &c, &Starts::default(), t(noon));
    assert_eq!(d.start, 0);
    assert_eq!(d.wake_at, Some(t(25 * 60 * MIN)), "01:00 the next day");
    let d = r.decide(
        &RolloutState::default(),
        &c,
        &Starts::default(),
        t(25 * 60 * MIN),
    );
    assert_eq!(d.start, 10);
}

#[test]
fn a_resumed_task_counts_failures_from_the_resume() {
    let mut r = four_waves();
    r.error_threshold = Some(ErrorThreshold {
        max_failures: Some(0),
        max_failure_percent: None,
        min_finished: 1,
        count: ErrorKind::ALL.to_vec(),
    });
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    start(&mut c[0], 1);
    finish(&mut c[0], 1, Some("DEVICE_RESULT_1"));
    let d = r.decide(&RolloutState::default(), &c, &Starts::default(), t(1));
    assert!(d.paused.is_some());
    // The operator resumes: the failed canary's wave is accepted as it is (it finished below its
    // threshold), and the driver counts only what finishes after the resume.
    let resumed = r.resume(&d.state, &c, t(2));
    assert_eq!(resumed.paused, None);
    assert_eq!((resumed.wave, resumed.resumed_at), (1, Some(t(2))));
    c[0].recent = Recent::default();
    let d = r.decide(&resumed, &c, &Starts::default(), t(3));
    assert_eq!((d.paused, d.start), (None, 10), "the next wave starts");
    // A pause by a threshold while the wave still runs resumes the same wave.
    let mut c = vec![counts(1), counts(10), counts(50), counts(39)];
    start(&mut c[0], 1);
    let running = RolloutState {
        paused: Some(Pause {
            reason: "r".to_owned(),
            at: t(1),
        }),
        ..RolloutState::default()
    };
    assert_eq!(r.resume(&running, &c, t(2)).wave, 0);
}

#[test]
fn error_codes_are_sorted_into_kinds() {
    for (code, kind) in [
        ("DEVICE_OFFLINE_TIMEOUT", ErrorKind::Timeout),
        ("UPGRADE_RESULT_TIMEOUT", ErrorKind::Timeout),
        ("DOWNLOAD_RESULT_TIMEOUT", ErrorKind::Timeout),
        ("SOURCE_VERSION_NOT_SUPPORTED", ErrorKind::Refusal),
        ("PCP_NOTIFY_REFUSED_1", ErrorKind::Refusal),
        ("PCP_EXECUTE_FAILED_2", ErrorKind::Refusal),
        ("FIRMWARE_URI_REFUSED", ErrorKind::Refusal),
        ("DEVICE_RESULT_5", ErrorKind::DeviceFailure),
        ("PCP_DOWNLOAD_FAILED_3", ErrorKind::DeviceFailure),
        ("VERSION_MISMATCH", ErrorKind::DeviceFailure),
        ("FIRMWARE_UPDATE_FAILED_8", ErrorKind::DeviceFailure),
    ] {
        assert_eq!(ErrorKind::of(code), kind, "{code}");
    }
}

#[test]
fn waves_typed_by_an_operator_parse() {
    assert_eq!(
        WaveSize::parse_list("waves", " 1%, 10 %,50, ").unwrap(),
        [
            WaveSize::Percent(1),
            WaveSize::Percent(10),
            WaveSize::Count(50)
        ]
    );
    assert!(WaveSize::parse_list("waves", "").unwrap().is_empty());
    let e = WaveSize::parse_list("waves", "1%, ten").unwrap_err();
    assert_eq!(e.field, "waves");
    assert!(e.message.contains("\"ten\""), "{e}");
}
