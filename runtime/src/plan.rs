//! Which instances to start or stop to reach the desired count (pure).

use crate::InstanceState;

/// What the plan needs to know about one live instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanInstance {
    /// Increases with spawn order: a larger id is a newer instance.
    pub id: u64,
    pub state: InstanceState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScalePlan {
    /// How many new instances to start.
    pub start: u32,
    /// Which instances to stop (by id), in order.
    pub stop: Vec<u64>,
}

/// Plans the way from `instances` to `desired`. Terminating and exited instances do not count.
/// Scale-down stops instances that are not ready first, then the newest (as a Kubernetes ReplicaSet
/// prefers unready and younger pods), so the instances that already carry traffic keep it.
pub fn plan_scale(instances: &[PlanInstance], desired: u32) -> ScalePlan {
    let mut live: Vec<PlanInstance> = instances
        .iter()
        .copied()
        .filter(|i| {
            matches!(
                i.state,
                InstanceState::Starting | InstanceState::Ready | InstanceState::NotReady
            )
        })
        .collect();
    let have = u32::try_from(live.len()).unwrap_or(u32::MAX);
    if have <= desired {
        return ScalePlan {
            start: desired - have,
            stop: Vec::new(),
        };
    }
    live.sort_by_key(|i| (i.state == InstanceState::Ready, std::cmp::Reverse(i.id)));
    ScalePlan {
        start: 0,
        stop: live
            .iter()
            .take((have - desired) as usize)
            .map(|i| i.id)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    fn i(id: u64, state: InstanceState) -> PlanInstance {
        PlanInstance { id, state }
    }

    #[test]
    fn plans_starts_and_stops() {
        let cases: Vec<(&str, Vec<PlanInstance>, u32, ScalePlan)> = vec![
            (
                "zero to two",
                vec![],
                2,
                ScalePlan {
                    start: 2,
                    stop: vec![],
                },
            ),
            (
                "steady",
                vec![i(1, Ready), i(2, Starting)],
                2,
                ScalePlan::default(),
            ),
            (
                "to zero stops all, unready first",
                vec![i(1, Ready), i(2, Starting)],
                0,
                ScalePlan {
                    start: 0,
                    stop: vec![2, 1],
                },
            ),
            (
                "newest ready first",
                vec![i(1, Ready), i(2, Ready), i(3, Ready)],
                1,
                ScalePlan {
                    start: 0,
                    stop: vec![3, 2],
                },
            ),
            (
                "not ready before newer ready",
                vec![i(1, NotReady), i(2, Ready), i(3, Ready)],
                2,
                ScalePlan {
                    start: 0,
                    stop: vec![1],
                },
            ),
            (
                "starting before ready",
                vec![i(5, Ready), i(4, Starting)],
                1,
                ScalePlan {
                    start: 0,
                    stop: vec![4],
                },
            ),
            (
                "terminating ones do not count",
                vec![i(1, Terminating), i(2, Ready), i(3, Exited)],
                2,
                ScalePlan {
                    start: 1,
                    stop: vec![],
                },
            ),
        ];
        for (name, instances, desired, want) in cases {
            assert_eq!(plan_scale(&instances, desired), want, "{name}");
        }
    }
}
