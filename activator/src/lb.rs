//! Load-balancing policies over a revision's healthy instances (Knative's `pkg/activator/net/lb_policy.go`).
//!
//! Pure: a policy sees the in-flight count of each healthy instance (in a stable order, sorted by address
//! as Knative sorts its pod trackers) and answers which one gets the next request, or none when every
//! instance is at its containerConcurrency.

/// Which policy a revision uses. Knative: `newRevisionThrottler` picks it from containerConcurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// containerConcurrency 1..=3: the first instance with a free slot (`firstAvailableLBPolicy`).
    FirstAvailable,
    /// containerConcurrency > 3: round robin over instances with a free slot (`newRoundRobinPolicy`).
    RoundRobin,
    /// containerConcurrency 0 (unlimited): the less loaded of two random instances
    /// (`randomChoice2Policy`, "power of two choices").
    RandomChoice2,
}

impl LbPolicy {
    /// Knative: cc == 0 -> randomChoice2 (with an infinite breaker), cc <= 3 -> first available,
    /// otherwise round robin.
    pub fn for_container_concurrency(cc: u32) -> Self {
        match cc {
            0 => LbPolicy::RandomChoice2,
            1..=3 => LbPolicy::FirstAvailable,
            _ => LbPolicy::RoundRobin,
        }
    }
}

/// State a policy keeps between picks (the round-robin cursor).
#[derive(Debug, Default, Clone)]
pub struct LbState {
    next: usize,
}

/// Picks the index in `in_flight` of the instance that gets the next request, or `None` when no instance
/// has a free slot. `cc` is the revision's containerConcurrency (0 = unlimited). `rand(n)` returns a
/// uniformly random number in `0..n` (n >= 1); it is only called by [`LbPolicy::RandomChoice2`].
pub fn pick(
    policy: LbPolicy,
    cc: u32,
    in_flight: &[u32],
    state: &mut LbState,
    rand: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let has_room = |load: u32| cc == 0 || load < cc;
    let n = in_flight.len();
    if n == 0 {
        return None;
    }
    match policy {
        LbPolicy::FirstAvailable => in_flight.iter().position(|&l| has_room(l)),
        LbPolicy::RoundRobin => {
            // Knative: the number of trackers might have shrunk, so reset to 0.
            if state.next >= n {
                state.next = 0;
            }
            let found = (0..n)
                .map(|i| (state.next + i) % n)
                .find(|&p| has_room(in_flight[p]))?;
            // Knative: "We want to start with the next index."
            state.next = found + 1;
            Some(found)
        }
        LbPolicy::RandomChoice2 => {
            // The policy is meant for cc == 0, where every instance has room; with a finite cc it
            // still must never pick a full instance, so it chooses among those with room.
            let candidates: Vec<usize> = (0..n).filter(|&i| has_room(in_flight[i])).collect();
            match candidates.len() {
                0 => None,
                // Knative: one tracker = no choice.
                1 => Some(candidates[0]),
                l => {
                    let r1 = rand(l);
                    // Knative: pick from [0, r1) and [r1+1, l), so the two differ.
                    let mut r2 = rand(l - 1);
                    if r2 >= r1 {
                        r2 += 1;
                    }
                    let (a, b) = (candidates[r1], candidates[r2]);
                    Some(match in_flight[a].cmp(&in_flight[b]) {
                        std::cmp::Ordering::Less => a,
                        std::cmp::Ordering::Greater => b,
                        // Knative: on a tie, a coin toss.
                        std::cmp::Ordering::Equal => {
                            if rand(2) == 0 {
                                a
                            } else {
                                b
                            }
                        }
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_rand(_: usize) -> usize {
        panic!("this policy must not use randomness")
    }

    #[test]
    fn policy_follows_container_concurrency_like_knative() {
        let table = [
            (0, LbPolicy::RandomChoice2),
            (1, LbPolicy::FirstAvailable),
            (3, LbPolicy::FirstAvailable),
            (4, LbPolicy::RoundRobin),
            (100, LbPolicy::RoundRobin),
        ];
        for (cc, want) in table {
            assert_eq!(LbPolicy::for_container_concurrency(cc), want, "cc={cc}");
        }
    }

    #[test]
    fn first_available_picks_the_first_instance_with_a_free_slot() {
        let table: [(&[u32], u32, Option<usize>); 5] = [
            (&[0, 0], 1, Some(0)),
            (&[1, 0], 1, Some(1)),
            (&[1, 1], 1, None),
            (&[3, 2, 0], 3, Some(1)),
            (&[], 1, None),
        ];
        for (loads, cc, want) in table {
            let got = pick(
                LbPolicy::FirstAvailable,
                cc,
                loads,
                &mut LbState::default(),
                &mut no_rand,
            );
            assert_eq!(got, want, "loads={loads:?} cc={cc}");
        }
    }

    #[test]
    fn round_robin_continues_after_the_last_pick_and_skips_full_instances() {
        let mut st = LbState::default();
        let mut r = no_rand;
        assert_eq!(
            pick(LbPolicy::RoundRobin, 5, &[0, 0, 0], &mut st, &mut r),
            Some(0)
        );
        assert_eq!(
            pick(LbPolicy::RoundRobin, 5, &[1, 0, 0], &mut st, &mut r),
            Some(1)
        );
        assert_eq!(
            pick(LbPolicy::RoundRobin, 5, &[1, 1, 5], &mut st, &mut r),
            Some(0)
        );
        assert_eq!(
            pick(LbPolicy::RoundRobin, 5, &[5, 5, 5], &mut st, &mut r),
            None
        );
        // The instance list shrank below the cursor: start over at 0.
        let mut st = LbState { next: 7 };
        assert_eq!(
            pick(LbPolicy::RoundRobin, 5, &[0, 0], &mut st, &mut r),
            Some(0)
        );
    }

    #[test]
    fn random_choice_of_two_takes_the_less_loaded_of_two_distinct_instances() {
        // rand always answers 0: r1 = 0, r2 = 0 -> shifted to 1; instances 0 and 1 compared.
        let mut zero = |_: usize| 0;
        let mut st = LbState::default();
        assert_eq!(
            pick(LbPolicy::RandomChoice2, 0, &[4, 2, 0], &mut st, &mut zero),
            Some(1)
        );
        assert_eq!(
            pick(LbPolicy::RandomChoice2, 0, &[1, 3, 0], &mut st, &mut zero),
            Some(0)
        );
        // Tie: the coin (0) keeps the first.
        assert_eq!(
            pick(LbPolicy::RandomChoice2, 0, &[2, 2], &mut st, &mut zero),
            Some(0)
        );
        // One instance: no choice, and cc 0 never runs out of room.
        assert_eq!(
            pick(LbPolicy::RandomChoice2, 0, &[1000], &mut st, &mut zero),
            Some(0)
        );
        assert_eq!(
            pick(LbPolicy::RandomChoice2, 0, &[], &mut st, &mut zero),
            None
        );
    }

    #[test]
    fn random_choice_of_two_never_picks_the_same_instance_twice_in_a_draw() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut rand = |n: usize| rng.usize(0..n);
        let mut st = LbState::default();
        // With loads [0, 9], the less loaded is always chosen unless both draws hit the same index,
        // which the shift rules out.
        for _ in 0..200 {
            assert_eq!(
                pick(LbPolicy::RandomChoice2, 0, &[0, 9], &mut st, &mut rand),
                Some(0)
            );
        }
    }
}
