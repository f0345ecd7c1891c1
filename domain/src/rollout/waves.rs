//! Which targets go in which wave: fixed when the task starts, reproducible from the task's seed.
//!
//! Targets are ordered by a keyed hash of their device id (SHA-256 of the seed and the id), so the
//! order depends on nothing but the seed and the ids: the same task assigns the same devices again after
//! a restart, on another instance, or in another Updraft version; and adding a target to a task never
//! moves the others.

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::{Wave, WaveSize};

/// A target: its device id and the groups it belongs to (for waves by group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The device.
    pub device_id: String,
    /// Its groups.
    pub group_ids: Vec<String>,
}

/// The wave of each target, in the order given: waves by group first take the members of their groups
/// still unassigned; waves by percentage (of all targets, rounded up, at least one) and by count take the
/// next ones in seed order; the last wave takes every target left. `waves` is never empty.
#[must_use]
pub fn assign(waves: &[Wave], seed: u64, targets: &[Target]) -> Vec<usize> {
    let n = targets.len();
    let last = waves.len().saturating_sub(1);
    let mut wave_of = vec![last; n];
    let mut taken = vec![false; n];
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_cached_key(|&i| (rank(seed, &targets[i].device_id), i));
    let mut next = 0; // position in `order` of the next candidate for a sized wave
    for (w, wave) in waves.iter().enumerate().take(last) {
        match &wave.size {
            WaveSize::Groups(groups) => {
                let groups: HashSet<&str> = groups.iter().map(String::as_str).collect();
                for (i, t) in targets.iter().enumerate() {
                    if !taken[i] && t.group_ids.iter().any(|g| groups.contains(g.as_str())) {
                        taken[i] = true;
                        wave_of[i] = w;
                    }
                }
            }
            size => {
                let mut want = size.count_of(n);
                while want > 0 && next < n {
                    let i = order[next];
                    next += 1;
                    if !taken[i] {
                        taken[i] = true;
                        wave_of[i] = w;
                        want -= 1;
                    }
                }
            }
        }
    }
    wave_of
}

/// The position of `device_id` in the seed's order.
fn rank(seed: u64, device_id: &str) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(device_id.as_bytes());
    let digest = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

impl WaveSize {
    /// How many of `n` targets a sized wave takes (`Rest` and groups: all).
    #[must_use]
    pub fn count_of(&self, n: usize) -> usize {
        match self {
            Self::Percent(p) => {
                let exact = (n * usize::from(*p)).div_ceil(100);
                exact.max(usize::from(n > 0)).min(n)
            }
            Self::Count(c) => usize::try_from(*c).unwrap_or(usize::MAX).min(n),
            Self::Groups(_) | Self::Rest => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                device_id: format!("dev-{i:05}"),
                group_ids: if i % 10 == 0 {
                    vec!["canary".to_owned()]
                } else {
                    Vec::new()
                },
            })
            .collect()
    }

    fn wave(size: WaveSize) -> Wave {
        Wave {
            size,
            ..Wave::default()
        }
    }

    fn sizes(assigned: &[usize], waves: usize) -> Vec<usize> {
        (0..waves)
            .map(|w| assigned.iter().filter(|&&a| a == w).count())
            .collect()
    }

    #[test]
    fn percentages_are_of_all_targets_rounded_up_and_the_last_wave_takes_the_rest() {
        let waves = [
            wave(WaveSize::Percent(1)),
            wave(WaveSize::Percent(10)),
            wave(WaveSize::Percent(50)),
            wave(WaveSize::Rest),
        ];
        let t = targets(1001);
        let a = assign(&waves, 7, &t);
        assert_eq!(sizes(&a, 4), [11, 101, 501, 388]);
        // Few targets: every sized wave still gets one while any are left.
        assert_eq!(sizes(&assign(&waves, 7, &targets(3)), 4), [1, 1, 1, 0]);
        assert_eq!(sizes(&assign(&waves, 7, &targets(0)), 4), [0, 0, 0, 0]);
    }

    #[test]
    fn the_seed_alone_decides_and_other_targets_do_not_move_a_device() {
        let waves = [wave(WaveSize::Count(5)), wave(WaveSize::Rest)];
        let t = targets(100);
        let a = assign(&waves, 42, &t);
        assert_eq!(a, assign(&waves, 42, &t), "reproducible");
        assert_ne!(a, assign(&waves, 43, &t), "another seed, another choice");
        // The same targets in another order: the same devices are chosen.
        let mut reversed = t.clone();
        reversed.reverse();
        let b = assign(&waves, 42, &reversed);
        let chosen = |a: &[usize], t: &[Target]| {
            let mut ids: Vec<String> = t
                .iter()
                .zip(a)
                .filter(|(_, w)| **w == 0)
                .map(|(t, _)| t.device_id.clone())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(chosen(&a, &t), chosen(&b, &reversed));
        // The canaries are spread over the fleet, not the first ids.
        assert_ne!(
            chosen(&a, &t),
            (0..5).map(|i| format!("dev-{i:05}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn group_waves_take_their_members_and_sized_waves_the_others() {
        let waves = [
            wave(WaveSize::Groups(vec!["canary".to_owned()])),
            wave(WaveSize::Count(20)),
            wave(WaveSize::Rest),
        ];
        let t = targets(100);
        let a = assign(&waves, 1, &t);
        assert_eq!(sizes(&a, 3), [10, 20, 70]);
        for (target, w) in t.iter().zip(&a) {
            assert_eq!(*w == 0, !target.group_ids.is_empty(), "{target:?}");
        }
    }

    #[test]
    fn a_count_larger_than_what_is_left_takes_what_is_left() {
        let waves = [
            wave(WaveSize::Count(8)),
            wave(WaveSize::Count(8)),
            wave(WaveSize::Rest),
        ];
        assert_eq!(sizes(&assign(&waves, 0, &targets(10)), 3), [8, 2, 0]);
    }
}
