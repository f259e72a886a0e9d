//! Phase 3, diff: owned users on the node with no active subscription are orphans; unexpired
//! active subscriptions absent from the node are missing. Runs on the blocking pool: at a
//! million users the sort and merge take tens of milliseconds.

use uuid::Uuid;

use crate::node::NodeUser;

/// Result of the diff.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    /// Users on the node (all, owned or not, duplicates removed).
    pub(crate) node_users: u64,
    /// Users carrying vpnbot's ownership marker for their own UUID.
    pub(crate) node_owned: u64,
    /// Users whose email looks like vpnbot's marker but matches no UUID of theirs (copied by
    /// hand, or mangled by the node): never removed, reported.
    pub(crate) unmatched_markers: u64,
    /// Owned node users without an active subscription on this node, sorted.
    pub(crate) orphans: Vec<Uuid>,
    /// Unexpired active subscriptions absent from the node, sorted.
    pub(crate) missing: Vec<Uuid>,
}

/// Whether vpnbot owns this node user: its email is the marker of exactly its own UUID. A
/// user whose marker names another UUID (copied by hand) is not owned and never removed.
pub(crate) fn owned(u: &NodeUser) -> bool {
    u.is_owned()
}

/// Merges the sorted snapshot with the node's list. Consumes (and frees) the node list here,
/// on the blocking pool, rather than on a runtime worker.
pub(crate) fn diff(live: &[(Uuid, bool)], node: Vec<NodeUser>) -> Diff {
    let mut unmatched_markers = 0u64;
    let mut users: Vec<(Uuid, bool)> = node
        .iter()
        .map(|u| {
            let own = owned(u);
            if !own && crate::node::looks_owned(&u.email) {
                unmatched_markers += 1;
            }
            (u.uuid, own)
        })
        .collect();
    drop(node);
    users.sort_unstable();
    // A UUID listed twice counts once; it is owned if any entry is owned (the sort puts
    // `true` last, and dedup keeps the first, so fold owned-ness forward first).
    let mut dedup: Vec<(Uuid, bool)> = Vec::with_capacity(users.len());
    for (id, own) in users {
        match dedup.last_mut() {
            Some(last) if last.0 == id => last.1 |= own,
            _ => dedup.push((id, own)),
        }
    }
    let mut d = Diff {
        node_users: dedup.len() as u64,
        node_owned: dedup.iter().filter(|u| u.1).count() as u64,
        unmatched_markers,
        ..Default::default()
    };
    let (mut i, mut j) = (0, 0);
    while i < live.len() || j < dedup.len() {
        match (live.get(i), dedup.get(j)) {
            (Some(l), Some(n)) if l.0 == n.0 => {
                i += 1;
                j += 1;
            }
            (Some(l), Some(n)) if l.0 < n.0 => {
                if l.1 {
                    d.missing.push(l.0);
                }
                i += 1;
            }
            (Some(l), None) => {
                if l.1 {
                    d.missing.push(l.0);
                }
                i += 1;
            }
            (_, Some(n)) => {
                if n.1 {
                    d.orphans.push(n.0);
                }
                j += 1;
            }
            (None, None) => break,
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::owned_email;

    #[test]
    fn orphans_are_owned_and_missing_are_unexpired() {
        let mut ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        let live = vec![(ids[0], true), (ids[1], true), (ids[2], false)];
        let node = vec![
            NodeUser::owned(ids[1]),
            NodeUser::owned(ids[3]),
            NodeUser {
                uuid: ids[4],
                email: "op@example".into(),
            },
            NodeUser {
                uuid: ids[5],
                email: owned_email(ids[0]),
            },
            NodeUser::owned(ids[3]),
        ];
        let d = diff(&live, node);
        assert_eq!(d.node_users, 4);
        assert_eq!(d.node_owned, 2);
        assert_eq!(d.orphans, vec![ids[3]]);
        assert_eq!(d.missing, vec![ids[0]], "expired ids[2] is not re-added");
    }
}
