//! What a run leaves behind: the once-a-second samples, the live progress line, the human
//! summary and the JSON report (field names are the contract with the bench scripts).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;

use crate::probe::Readings;
use crate::worker::{Counters, Stat};

/// One second of a run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub open: u64,
    pub joined: u64,
    /// Joined connections with a block since the probe began (0 before it).
    pub reached: u64,
    pub handshakes_per_s: f64,
    pub errors: u64,
    pub gateway_rss_bytes: Option<u64>,
    pub slab_bytes: Option<u64>,
    pub loadgen_rss_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Blocks {
    /// Rooms the probe message was accepted into (202).
    pub probed_rooms: u64,
    /// Joined connections that received at least one block after the probe.
    pub reached: u64,
    /// Joined connections that did not.
    pub missing: u64,
    /// Seconds to publish the probe message into every room.
    pub publish_s: f64,
    /// Seconds from the first publish until every joined connection had a block (None: not all did).
    pub all_reached_s: Option<f64>,
}

/// The JSON report of the `connect` scenario.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub target: String,
    pub connections_target: u64,
    pub connections_held: u64,
    pub joined: u64,
    pub ramp_s: f64,
    pub handshakes_per_s_mean: f64,
    pub handshakes_per_s_peak: f64,
    pub gateway_rss_before_bytes: Option<u64>,
    pub gateway_rss_after_ramp_bytes: Option<u64>,
    pub gateway_bytes_per_conn: Option<f64>,
    pub slab_before_bytes: Option<u64>,
    pub slab_after_ramp_bytes: Option<u64>,
    pub sunreclaim_before_bytes: Option<u64>,
    pub sunreclaim_after_ramp_bytes: Option<u64>,
    /// Slab growth ÷ connections held: both ends of each loopback pair.
    pub kernel_bytes_per_pair: Option<f64>,
    pub loadgen_rss_bytes: Option<u64>,
    pub loadgen_bytes_per_conn: Option<f64>,
    /// The generator's own state per connection slot, by construction.
    pub loadgen_state_bytes_per_conn: usize,
    pub blocks: Blocks,
    pub errors: BTreeMap<String, u64>,
    pub samples: Vec<Sample>,
    // Context beyond the contract.
    pub rooms: u32,
    pub sources: String,
    pub threads: u32,
    pub rings: u64,
    pub gateway_online: Option<u64>,
    pub pings_sent: u64,
    pub pongs: u64,
    pub frames: u64,
    /// Receives that found the provided buffers empty (retried; 0 while the budget holds).
    pub recv_nobufs: u64,
    pub deadline_hit: bool,
    /// connections_held == connections_target, all joined, no block missing.
    pub passed: bool,
}

/// `(after − before) ÷ n`, when all are known and n > 0.
pub fn per_conn(before: Option<u64>, after: Option<u64>, n: u64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (n > 0).then(|| (a as f64 - b as f64) / n as f64)
}

/// The live line: time, phase, levels, rate, errors, memory.
pub fn progress_line(t_s: f64, phase: &str, c: &Counters, hs_per_s: f64, r: &Readings) -> String {
    format!(
        "[{t_s:7.1}s] {phase:<6} open {:>8}  joined {:>8}  hs/s {:>7.0}  errors {:>6}  gateway {}  slab {}  self {}",
        c[Stat::Open],
        c[Stat::Joined],
        hs_per_s,
        c[Stat::Errors],
        mib(r.gateway_rss),
        mib(r.slab),
        mib(r.own_rss),
    )
}

fn mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
        None => "-".into(),
    }
}

fn bytes_each(v: Option<f64>) -> String {
    match v {
        Some(b) => format!("{b:.0} B"),
        None => "-".into(),
    }
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "connect {}: held {}/{}  joined {}  ramp {:.1} s  handshakes/s mean {:.0} peak {:.0}\n",
        r.target,
        r.connections_held,
        r.connections_target,
        r.joined,
        r.ramp_s,
        r.handshakes_per_s_mean,
        r.handshakes_per_s_peak
    );
    s += &format!(
        "  memory per connection: gateway {}  kernel per pair {}  loadgen {}\n",
        bytes_each(r.gateway_bytes_per_conn),
        bytes_each(r.kernel_bytes_per_pair),
        bytes_each(r.loadgen_bytes_per_conn)
    );
    s += &format!(
        "  gateway RSS {} -> {}  slab {} -> {}  loadgen RSS {}  rings {}\n",
        mib(r.gateway_rss_before_bytes),
        mib(r.gateway_rss_after_ramp_bytes),
        mib(r.slab_before_bytes),
        mib(r.slab_after_ramp_bytes),
        mib(r.loadgen_rss_bytes),
        r.rings
    );
    s += &format!(
        "  blocks: {} rooms probed, {} connections reached, {} missing; pings {} pongs {}\n",
        r.blocks.probed_rooms, r.blocks.reached, r.blocks.missing, r.pings_sent, r.pongs
    );
    if r.errors.is_empty() {
        s += "  errors: none\n";
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s += &format!("  errors: {}\n", list.join(", "));
    }
    s += if r.passed { "  PASS" } else { "  FAIL" };
    if r.deadline_hit {
        s += " (deadline hit)";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_conn_needs_everything() {
        assert_eq!(per_conn(Some(1000), Some(3000), 10), Some(200.0));
        assert_eq!(per_conn(Some(3000), Some(1000), 10), Some(-200.0));
        assert_eq!(per_conn(None, Some(3000), 10), None);
        assert_eq!(per_conn(Some(1), Some(3000), 0), None);
    }

    #[test]
    fn progress_line_shows_levels_and_memory() {
        let mut c = Counters::default();
        c[Stat::Open] = 12;
        c[Stat::Joined] = 10;
        let r = Readings { gateway_rss: Some(3 << 20), slab: None, sunreclaim: None, own_rss: Some(1 << 20) };
        let line = progress_line(1.5, "ramp", &c, 99.0, &r);
        assert!(line.contains("open       12") && line.contains("joined       10"), "{line}");
        assert!(line.contains("gateway 3.0 MiB") && line.contains("slab -"), "{line}");
    }
}
