//! Sets of journal seqs as sorted, disjoint half-open ranges: the compact form of Ack frames, of the
//! Checkpoint's pending set, and of recovery's "known pending but not found" set.

use super::frame::SeqRange;

/// Collapses ascending, distinct seqs into sorted, disjoint `[start, end)` ranges.
///
/// A seq of `u64::MAX` cannot be represented half-open and is never issued (the journal refuses to
/// assign it); it is skipped here rather than overflowing.
pub(super) fn collapse(seqs: impl IntoIterator<Item = u64>) -> Vec<SeqRange> {
    let mut out: Vec<SeqRange> = Vec::new();
    for s in seqs {
        let Some(next) = s.checked_add(1) else {
            continue;
        };
        match out.last_mut() {
            Some((_, end)) if *end == s => *end = next,
            _ => out.push((s, next)),
        }
    }
    out
}

/// A set of seqs as sorted, disjoint, non-adjacent `[start, end)` ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct RangeSet(Vec<SeqRange>);

impl RangeSet {
    /// Adds `[s, e)`.
    pub fn insert(&mut self, (s, e): SeqRange) {
        if s >= e {
            return;
        }
        let mut merged = (s, e);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b < merged.0 {
                out.push((a, b));
            } else if a > merged.1 {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
            }
        }
        if !placed {
            out.push(merged);
        }
        self.0 = out;
    }

    /// Removes `[s, e)`.
    pub fn remove(&mut self, (s, e): SeqRange) {
        if s >= e || self.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b <= s || a >= e {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s));
            }
            if b > e {
                out.push((e, b));
            }
        }
        self.0 = out;
    }

    /// Builds a set from ranges in any order (empty ranges ignored). `O(n log n)`.
    pub fn from_ranges(mut ranges: Vec<SeqRange>) -> Self {
        ranges.retain(|&(s, e)| s < e);
        ranges.sort_unstable();
        let mut out: Vec<SeqRange> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match out.last_mut() {
                Some((_, end)) if *end >= s => *end = (*end).max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet(out)
    }

    /// Keeps only the seqs that are in `keep` or at/after `from`. `O(n + m)`.
    pub fn retain_within(&mut self, keep: &RangeSet, from: u64) {
        if self.0.is_empty() {
            return;
        }
        let mut allowed = keep.clone();
        allowed.insert((from, u64::MAX));
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while let (Some(&(a, b)), Some(&(c, d))) = (self.0.get(i), allowed.0.get(j)) {
            let (lo, hi) = (a.max(c), b.min(d));
            if lo < hi {
                out.push((lo, hi));
            }
            if b < d {
                i += 1;
            } else {
                j += 1;
            }
        }
        self.0 = out;
    }

    /// How many seqs the set holds (saturating).
    pub fn len(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |n, &(a, b)| n.saturating_add(b - a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn members(r: &RangeSet) -> BTreeSet<u64> {
        r.0.iter().flat_map(|&(a, b)| a..b).collect()
    }

    #[test]
    fn collapse_makes_ranges() {
        assert_eq!(collapse([1, 2, 3, 5, 7, 8]), vec![(1, 4), (5, 6), (7, 9)]);
        assert_eq!(
            collapse([u64::MAX - 1, u64::MAX]),
            vec![(u64::MAX - 1, u64::MAX)]
        );
        assert!(collapse([]).is_empty());
    }

    proptest! {
        /// RangeSet behaves like a set of integers.
        #[test]
        fn range_set_matches_a_set(ops in proptest::collection::vec((0u8..3, 0u64..40, 0u64..40), 0..30)) {
            let mut r = RangeSet::default();
            let mut m = BTreeSet::new();
            for (op, a, b) in ops {
                let (s, e) = (a.min(b), a.max(b));
                match op {
                    0 => { r.insert((s, e)); m.extend(s..e); }
                    1 => { r.remove((s, e)); for x in s..e { m.remove(&x); } }
                    _ => {
                        let keep = RangeSet::from_ranges(vec![(s, e), (e / 2, e / 2 + 1)]);
                        r.retain_within(&keep, 30);
                        m.retain(|&x| (s..e).contains(&x) || x == e / 2 || x >= 30);
                    }
                }
                prop_assert_eq!(members(&r), m.clone());
                prop_assert_eq!(r.len(), m.len() as u64);
                // Canonical: sorted, disjoint, non-adjacent.
                for w in r.0.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            }
        }
    }
}
