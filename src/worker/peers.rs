//! Whether this worker reaches the other workers at the addresses they advertise. A Task reads
//! its inputs from the workers that wrote them, so a worker that cannot connect to a peer fails
//! every Task that reads from it. The coordinator names the live peers in each heartbeat's
//! answer; this worker dials each new one once, and those it failed to reach again every
//! `PEER_RECHECK_MS`. What it cannot reach is logged loud (once per peer) and told to the
//! coordinator, which shows it in `quiver.workers`.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use crate::protocol::error_text;
use crate::transport::{worker_peer, ClientSecurity};

/// How often a peer this worker failed to reach is dialled again.
pub const PEER_RECHECK_MS: u64 = 10_000;
/// Peers remembered as reached; beyond it the memory starts over (and peers are dialled again).
const PEERS_REMEMBERED_MAX: usize = 10_000;

#[derive(Default)]
pub(super) struct PeerChecks {
    reached: HashSet<String>,
    unreachable: BTreeSet<String>,
    /// A round of checks is under way: the next heartbeat starts none.
    checking: bool,
    last_round: Option<Instant>,
}

impl PeerChecks {
    /// The peers to dial now (none while a round runs): those never dialled, and, at most every
    /// `PEER_RECHECK_MS`, those that were unreachable. Peers no longer named are forgotten.
    pub(super) fn due(&mut self, peers: &[String], now: Instant) -> Vec<String> {
        self.unreachable.retain(|p| peers.contains(p));
        if self.checking {
            return Vec::new();
        }
        let recheck = self.last_round.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(PEER_RECHECK_MS));
        let due: Vec<String> = peers
            .iter()
            .filter(|p| !self.reached.contains(*p) && (recheck || !self.unreachable.contains(*p)))
            .cloned()
            .collect();
        if !due.is_empty() {
            self.checking = true;
            self.last_round = Some(now);
        }
        due
    }

    /// Records a round's results; returns the peers that became unreachable.
    pub(super) fn record(&mut self, results: Vec<(String, bool)>) -> Vec<String> {
        self.checking = false;
        if self.reached.len() > PEERS_REMEMBERED_MAX {
            self.reached.clear();
        }
        let mut lost = Vec::new();
        for (peer, reached) in results {
            if reached {
                self.unreachable.remove(&peer);
                self.reached.insert(peer);
            } else if self.unreachable.insert(peer.clone()) {
                lost.push(peer);
            }
        }
        lost
    }

    pub(super) fn unreachable(&self) -> Vec<String> {
        self.unreachable.iter().cloned().collect()
    }
}

/// Dials each peer (bounded by the connect timeout); returns whether each was reached, and logs
/// why for those that were not.
pub(super) async fn dial(peers: Vec<String>, own_url: &str, security: &ClientSecurity) -> Vec<(String, bool)> {
    let dials = peers.into_iter().map(|peer| async move {
        match worker_peer(&peer, security).await {
            Ok(_) => (peer, true),
            Err(e) => {
                tracing::error!(
                    "this worker ({own_url}) cannot reach the worker at {peer} ({}): Tasks here that read its outputs will fail; \
                     workers must reach each other at the addresses they advertise (--advertise)",
                    error_text(&e)
                );
                (peer, false)
            }
        }
    });
    futures::future::join_all(dials).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_peer_is_dialled_once_when_reached_and_again_later_when_not() {
        let mut checks = PeerChecks::default();
        let t0 = Instant::now();
        let peers = names(&["a", "b"]);
        assert_eq!(checks.due(&peers, t0), peers);
        assert!(checks.due(&peers, t0).is_empty(), "a round is under way");
        assert_eq!(checks.record(vec![("a".into(), true), ("b".into(), false)]), names(&["b"]));
        assert_eq!(checks.unreachable(), names(&["b"]));
        assert!(checks.due(&peers, t0 + Duration::from_millis(10)).is_empty(), "b waits for the recheck");
        let later = t0 + Duration::from_millis(PEER_RECHECK_MS);
        assert_eq!(checks.due(&peers, later), names(&["b"]));
        assert!(checks.record(vec![("b".into(), false)]).is_empty(), "said once");
        assert_eq!(checks.due(&names(&["a"]), later), Vec::<String>::new());
        assert!(checks.unreachable().is_empty(), "a peer no longer named is forgotten");
    }
}
