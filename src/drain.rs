//! Starting a drain and reading its progress, for the API (`/v1/admin/drain`) and the signal
//! handler: the plan every shard follows (`hub::host::drain`) made from the config and a
//! request's overrides, posted to every shard's inbox, and the state summed from the shards'
//! published gauges.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::hub::host::DrainPlan;
use crate::hub::mail::{HostMail, Mail};
use crate::ids::ShardId;
use crate::metrics::{Series, Snapshot};
use crate::shard::mesh::Mesh;

/// What a drain request may change from the config (every field optional).
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub url: Option<String>,
    pub reason: Option<String>,
    pub rate_per_s: Option<u32>,
    pub deadline_ms: Option<u64>,
    pub delay_ms: Option<u32>,
    pub jitter_ms: Option<u32>,
}

/// The plan for each of `shards` shards: the node-wide rate split evenly. Clients go to the
/// request's URL, else `drain.url`, else (in a cluster) the other live nodes' `peers`, else
/// back to the same address.
pub fn plan(c: &Config, shards: usize, o: Overrides, peers: &[String]) -> DrainPlan {
    let url = o.url.unwrap_or_else(|| c.drain.url.clone());
    let urls: Vec<Arc<str>> = if url.is_empty() && !peers.is_empty() {
        peers.iter().map(|p| Arc::from(p.as_str())).collect()
    } else {
        vec![Arc::from(url)]
    };
    let rate = o.rate_per_s.unwrap_or(c.drain.reconnect_rate_per_s);
    DrainPlan {
        rate_per_s: rate.div_ceil(shards.max(1) as u32),
        deadline_ms: o.deadline_ms.unwrap_or(c.drain.deadline_ms),
        delay_ms: o.delay_ms.unwrap_or(c.drain.delay_ms),
        jitter_ms: o.jitter_ms.unwrap_or(c.drain.jitter_ms),
        urls: urls.into(),
        reason: Arc::from(o.reason.unwrap_or_else(|| "server draining".into())),
    }
}

/// Starts the drain on every shard (a full inbox is waited out: the drain must arrive).
pub fn start(mesh: &Mesh, plan: &DrainPlan) {
    for i in 0..mesh.shards() {
        let to = ShardId(i as u16);
        let mut mail = Mail::from(HostMail::Drain(plan.clone()));
        while let Err(back) = mesh.send(to, mail) {
            mail = back;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Where the node's drain is, from the shards' last published gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Shards not draining, flushing, sending reconnects, done.
    pub phases: [usize; 4],
    pub remaining: u64,
    pub reconnects: u64,
}

impl Progress {
    pub fn read(shards: &[Snapshot]) -> Progress {
        let mut phases = [0; 4];
        for s in shards {
            phases[(s.get(Series::DrainPhase) as usize).min(3)] += 1;
        }
        let remaining = shards.iter().map(|s| s.get(Series::Connections)).sum();
        let reconnects = shards.iter().map(|s| s.get(Series::Reconnects)).sum();
        Progress { phases, remaining, reconnects }
    }

    /// Every shard has drained.
    pub fn done(&self) -> bool {
        self.phases[..3].iter().all(|&n| n == 0)
    }

    /// `idle`, `flushing`, `draining` or `done`, and the figures.
    pub fn json(&self) -> Value {
        let state = match self.phases {
            [_, 0, 0, 0] => "idle",
            _ if self.done() => "done",
            [_, f, 0, _] if f > 0 => "flushing",
            _ => "draining",
        };
        json!({"state": state, "connections": self.remaining, "reconnects_sent": self.reconnects})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_splits_the_rate_and_takes_overrides() {
        let c = Config::default();
        let urls = |p: &DrainPlan| p.urls.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let p = plan(&c, 3, Overrides::default(), &[]);
        assert_eq!((p.rate_per_s, p.deadline_ms, urls(&p)), (667, 600_000, vec![String::new()]));
        let o = || Overrides { url: Some("wss://b.example/ws".into()), rate_per_s: Some(10), ..Overrides::default() };
        let p = plan(&c, 2, o(), &[]);
        assert_eq!((p.rate_per_s, urls(&p)), (5, vec!["wss://b.example/ws".to_string()]));
        // In a cluster the peers are used only when neither the request nor the config names a URL.
        let peers = ["ws://b/".to_string(), "ws://c/".to_string()];
        assert_eq!(urls(&plan(&c, 2, o(), &peers)), ["wss://b.example/ws"]);
        assert_eq!(urls(&plan(&c, 2, Overrides::default(), &peers)), peers);
    }

    #[test]
    fn a_cluster_drain_spreads_clients_over_the_peers() {
        let peers = ["ws://b/".to_string(), "ws://c/".to_string()];
        let p = plan(&Config::default(), 1, Overrides::default(), &peers);
        let told: Vec<&str> = (0..1000).map(|k| p.url_for(crate::ids::ConnKey(k), 1)).collect();
        let to_b = told.iter().filter(|u| **u == "ws://b/").count();
        assert!((400..=600).contains(&to_b), "{to_b} of 1000 to b");
        assert!(told.iter().all(|u| *u == "ws://b/" || *u == "ws://c/"));
    }

    #[test]
    fn progress_reads_the_shards_gauges() {
        let shards = [Snapshot::default(), Snapshot::default()];
        assert_eq!(Progress::read(&shards).json()["state"], "idle");
        let mut c = crate::metrics::Counters::default();
        c.set(Series::DrainPhase, 2);
        c.set(Series::Connections, 7);
        c.publish(&shards[0]);
        let p = Progress::read(&shards);
        assert_eq!((p.json()["state"].as_str(), p.remaining), (Some("draining"), 7));
        c.set(Series::DrainPhase, 3);
        c.set(Series::Connections, 0);
        c.publish(&shards[0]);
        c.publish(&shards[1]);
        assert!(Progress::read(&shards).done());
    }
}
