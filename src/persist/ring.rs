//! Consistent hashing (ketama-style): each memcached node owns many points on a 64-bit ring; a
//! job's copies go to the first distinct nodes found walking clockwise from the hash of its
//! key. Adding or removing a node only moves the keys next to its points.
//!
//! Placement only spreads load: recovery reads every node, so a different ring (other nodes,
//! another gearhouse version) never hides a job.

/// Points per node: enough for an even spread with a handful of nodes.
const POINTS_PER_NODE: u32 = 160;

/// The ring over node indexes `0..n`.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u16)>,
    nodes: usize,
}

/// FNV-1a then a 64-bit finaliser: stable across versions and platforms, no dependency.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Ring {
    /// A ring for the nodes named `names` (the names place the points, so the same list gives
    /// the same ring on every server).
    pub fn new(names: &[String]) -> Ring {
        let mut points = Vec::with_capacity(names.len() * POINTS_PER_NODE as usize);
        for (i, name) in names.iter().enumerate() {
            for p in 0..POINTS_PER_NODE {
                points.push((hash(format!("{name}-{p}").as_bytes()), i as u16));
            }
        }
        points.sort_unstable();
        Ring {
            points,
            nodes: names.len(),
        }
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Distinct nodes in ring order starting at `key_hash`, for which `usable` holds, up to `n`.
    pub fn pick(&self, key_hash: u64, n: usize, usable: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        if self.points.is_empty() || n == 0 {
            return out;
        }
        let start = self.points.partition_point(|&(h, _)| h < key_hash);
        let mut seen: u32 = 0;
        for i in 0..self.points.len() {
            let node = self.points[(start + i) % self.points.len()].1 as usize;
            if seen & (1 << node) != 0 {
                continue;
            }
            seen |= 1 << node;
            if usable(node) {
                out.push(node);
                if out.len() == n {
                    break;
                }
            }
            if seen.count_ones() as usize == self.nodes {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn picks_distinct_nodes_and_skips_unusable_ones() {
        let r = Ring::new(&names(3));
        for k in 0..1000u64 {
            let h = hash(&k.to_le_bytes());
            let p = r.pick(h, 2, |_| true);
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            let q = r.pick(h, 2, |n| n != p[0]);
            assert_eq!(q.len(), 2);
            assert!(!q.contains(&p[0]));
            assert_eq!(q[0], p[1], "the next node takes over");
            assert_eq!(r.pick(h, 3, |n| n == 1), vec![1]);
        }
    }

    #[test]
    fn adding_a_node_moves_few_keys_and_load_is_even() {
        let a = Ring::new(&names(4));
        let b = Ring::new(&names(5));
        let mut moved = 0;
        let mut load = [0u32; 4];
        let n = 20_000u64;
        for k in 0..n {
            let h = hash(format!("gearhouse:n:j:{k}").as_bytes());
            let pa = a.pick(h, 1, |_| true)[0];
            load[pa] += 1;
            if pa != b.pick(h, 1, |_| true)[0] {
                moved += 1;
            }
        }
        // Ideal: 1/5 of the keys move to the new node.
        assert!(moved < n as u32 / 4, "moved {moved} of {n}");
        for l in load {
            assert!(l > 4000 && l < 6000, "uneven load {load:?}");
        }
    }
}
