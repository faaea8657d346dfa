//! Pipeline arithmetic: which groups become stages (the fewest, then the
//! fastest) and how many layers each stage gets (proportional to speed,
//! capped by memory).

use std::cmp::Ordering;

use super::hardware::Group;
use super::model::LayerCost;
use super::ShardOptions;

/// The fewest groups whose whole-layer capacity covers `layers`, preferring
/// fast groups: `k` is the smallest count the largest groups reach; then
/// each of the `k` slots takes the most preferred group (fastest, then
/// larger, cheaper, lower node and GPU index) that still lets the remaining
/// slots cover the rest. `None` when the groups cannot cover the layers or
/// need more than `max_stages`. Returns indices into `groups`.
pub(super) fn fewest_stages(
    groups: &[Group],
    layers: u32,
    cost: &LayerCost,
    opts: &ShardOptions,
) -> Option<Vec<usize>> {
    let caps: Vec<u64> = groups
        .iter()
        .map(|g| g.layer_capacity(cost) as u64)
        .collect();
    let k = stages_needed(&caps, layers)?;
    if k > opts.max_stages as usize {
        return None;
    }
    let speeds: Vec<f64> = groups.iter().map(|g| g.layer_speed(cost, opts)).collect();
    let mut order: Vec<usize> = (0..groups.len()).filter(|&i| caps[i] > 0).collect();
    order.sort_by(|&a, &b| {
        speeds[b]
            .total_cmp(&speeds[a])
            .then(caps[b].cmp(&caps[a]))
            .then(groups[a].cost.total_cmp(&groups[b].cost))
            .then(groups[a].node.cmp(&groups[b].node))
            .then(groups[a].gpus.cmp(&groups[b].gpus))
    });
    let mut picked = vec![false; groups.len()];
    let mut chosen = Vec::with_capacity(k);
    let mut need = layers as u64;
    for slot in 0..k {
        let after = k - slot - 1;
        // capacities of the groups still free, largest first
        let mut free: Vec<u64> = order
            .iter()
            .filter(|&&i| !picked[i])
            .map(|&i| caps[i])
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let top = |n: usize| free.iter().take(n).sum::<u64>();
        let (top_after, top_after_plus_one) = (top(after), top(after + 1));
        let threshold = if after == 0 {
            u64::MAX
        } else {
            free[after - 1]
        };
        let pick = order.iter().copied().find(|&i| {
            if picked[i] {
                return false;
            }
            // the best `after` capacities among the others
            let others = if after > 0 && caps[i] >= threshold {
                top_after_plus_one - caps[i]
            } else {
                top_after
            };
            need.saturating_sub(caps[i]) <= others
        })?;
        picked[pick] = true;
        chosen.push(pick);
        need = need.saturating_sub(caps[pick]);
    }
    debug_assert_eq!(need, 0, "the chosen stages cover every layer");
    Some(chosen)
}

/// The smallest number of groups (largest first) whose capacities reach
/// `layers`; `None` when all of them together fall short.
pub(super) fn stages_needed(caps: &[u64], layers: u32) -> Option<usize> {
    let mut sorted = caps.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut held = 0u64;
    for (n, cap) in sorted.iter().enumerate() {
        held += cap;
        if held >= layers as u64 {
            return Some(n + 1);
        }
    }
    None
}

/// Layers per stage for `stages` of `(speed, capacity in layers)`: each
/// stage's share is proportional to its speed (so every stage spends the
/// same time per step), a stage whose share exceeds its capacity is capped
/// and the rest is shared again among the others (water-filling); the last
/// real-valued shares become integers by largest remainder (ties to the
/// earlier stage). `None` when the capacities sum to less than `total`.
pub(super) fn split_layers(total: u32, stages: &[(f64, u32)]) -> Option<Vec<u32>> {
    let caps: Vec<u64> = stages.iter().map(|s| s.1 as u64).collect();
    if caps.iter().sum::<u64>() < total as u64 {
        return None;
    }
    let mut out = vec![0u64; stages.len()];
    let mut open: Vec<usize> = (0..stages.len()).filter(|&i| caps[i] > 0).collect();
    let mut left = total as u64;
    while left > 0 && !open.is_empty() {
        let speed_sum: f64 = open.iter().map(|&i| stages[i].0.max(0.0)).sum();
        let share = |i: usize| {
            if speed_sum > 0.0 {
                left as f64 * stages[i].0.max(0.0) / speed_sum
            } else {
                left as f64 / open.len() as f64
            }
        };
        let capped: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| share(i) >= (caps[i] - out[i]) as f64)
            .collect();
        if !capped.is_empty() {
            for &i in &capped {
                let room = caps[i] - out[i];
                out[i] += room;
                left -= room;
            }
            open.retain(|i| !capped.contains(i));
            continue;
        }
        // no stage is capped: floor every share, then hand out the rest
        let mut fractions: Vec<(usize, f64)> = Vec::with_capacity(open.len());
        let mut given = 0;
        for &i in &open {
            let s = share(i);
            let whole = s.floor() as u64;
            out[i] += whole;
            given += whole;
            fractions.push((i, s - s.floor()));
        }
        let mut rest = left - given;
        fractions.sort_by(|a, b| match b.1.total_cmp(&a.1) {
            Ordering::Equal => a.0.cmp(&b.0),
            o => o,
        });
        while rest > 0 {
            let before = rest;
            for &(i, _) in &fractions {
                if rest > 0 && out[i] < caps[i] {
                    out[i] += 1;
                    rest -= 1;
                }
            }
            if rest == before {
                return None;
            }
        }
        left = 0;
    }
    if left > 0 {
        return None;
    }
    Some(out.into_iter().map(|x| x as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_proportional_capped_and_exact() {
        // equal stages: 126 layers → 63/63
        assert_eq!(
            split_layers(126, &[(1.0, 100), (1.0, 100)]),
            Some(vec![63, 63])
        );
        // a fast stage capped at 66, the rest shared by two equal slow ones
        assert_eq!(
            split_layers(80, &[(20.0, 66), (1.0, 9), (1.0, 9)]),
            Some(vec![66, 7, 7])
        );
        // odd remainder goes to the earlier stage
        assert_eq!(split_layers(5, &[(1.0, 9), (1.0, 9)]), Some(vec![3, 2]));
        // 3:1 speed
        assert_eq!(
            split_layers(40, &[(3.0, 40), (1.0, 40)]),
            Some(vec![30, 10])
        );
        assert_eq!(split_layers(10, &[(1.0, 4), (1.0, 5)]), None);
    }

    #[test]
    fn stages_needed_counts_the_largest_first() {
        assert_eq!(stages_needed(&[9, 66, 9, 9], 80), Some(3));
        assert_eq!(stages_needed(&[9, 9], 80), None);
        assert_eq!(stages_needed(&[80], 80), Some(1));
    }
}
