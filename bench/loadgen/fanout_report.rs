//! What a `fanout` run leaves behind: the JSON report (its field names are the contract with
//! the bench scripts), the merge of every receiving thread's histogram and tracker into the
//! delivery figures, and the human summary.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::fanout_book::Book;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReachAll {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub count: u64,
}

/// barrage's own drop counters over the run (window start to the end of the drain).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerCounters {
    /// `barrage_messages_dropped_total`, all labels: messages the room dropped (each is lost
    /// to every member).
    pub messages_dropped: u64,
    /// `barrage_frames_dropped_total`, all labels: frames not sent to one connection.
    pub frames_dropped: u64,
}

/// The JSON report of the `fanout` scenario.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub label: Option<String>,
    pub kind: &'static str,
    pub target: String,
    pub members: u64,
    pub rooms: u32,
    pub mode: &'static str,
    pub rate_target: Option<f64>,
    pub window: Option<u64>,
    pub message_bytes: usize,
    pub duration_s: f64,
    pub subscribed: u64,
    /// Messages accepted during the window (the measured ones).
    pub published: u64,
    pub publish_rate: f64,
    /// Deliveries of measured messages, counted up to the end of the drain (at most one per
    /// member and message: duplicates apart).
    pub delivered: u64,
    /// Deliveries received while the window was open ÷ its length (receive time: throughput).
    pub delivered_per_s: f64,
    /// Data frames received while the window was open.
    pub frames: u64,
    pub frames_per_s: f64,
    pub bytes_per_s: f64,
    pub messages_per_frame: f64,
    /// published × members of each message's room (less its stalled members).
    pub expected: u64,
    pub lost: u64,
    /// barrage: the part of `lost` that its drop counters account for (null for peers).
    pub server_dropped_counted: Option<u64>,
    pub latency_ns: Latency,
    pub reach_all_ns: ReachAll,
    pub server_cpu_s: Option<f64>,
    pub cpu_s_per_million_deliveries: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    pub publish_errors: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub passed: bool,
    // Context beyond the contract.
    pub warmup_s: f64,
    pub publishers: u32,
    pub threads: u32,
    /// Deliveries received while the window was open (the numerator of the `_per_s` figures).
    pub delivered_in_window: u64,
    /// Of `lost`: member-messages of messages no member received, and of messages some did.
    pub lost_whole: u64,
    pub lost_partial: u64,
    /// Messages no member received.
    pub messages_missing: u64,
    pub duplicates: u64,
    pub server_counters: Option<ServerCounters>,
    /// The most messages of ours seen in one frame.
    pub messages_per_frame_max: u64,
    /// Messages sent before this run (barrage's history backfill of an earlier run), ignored.
    pub stale_messages: u64,
    pub saturate_stalls: u64,
    /// Seconds from the window's end until every delivery was in (or the drain gave up).
    pub drain_s: f64,
    pub rings: u64,
    pub recv_nobufs: u64,
    pub deadline_hit: bool,
    /// Members that stopped reading once subscribed (`--stalled`), left out of `expected`.
    pub stalled: u64,
}

/// Deliveries worked out from the merged trackers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deliveries {
    pub expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost_whole: u64,
    pub lost_partial: u64,
    pub messages_missing: u64,
    pub reach_all: ReachAll,
}

/// Walks every measured message of every stream: delivered (capped at the room's members that
/// read: stalled ones are expected to receive nothing),
/// duplicates, losses (whole or partial), and the reach-everyone latency of those that
/// reached every member. `counts` and `worst_us` are the merged trackers.
pub fn deliveries(book: &Book, counts: &[u32], worst_us: &[u32]) -> Deliveries {
    let mut d = Deliveries::default();
    let mut reach = Histogram::<u64>::new_with_bounds(1, crate::fanout_recv::LATENCY_NS_MAX, 3).expect("valid bounds");
    for j in 0..book.streams.count() {
        let members = book.readers_in(book.streams.of(j).1);
        let s = &book.stream[j as usize];
        let measured = book.measured(j).min(s.cap);
        for slot in s.offset..s.offset + measured {
            let (n, worst) = (u64::from(counts[slot as usize]), u64::from(worst_us[slot as usize]));
            d.expected += members;
            d.delivered += n.min(members);
            d.duplicates += n.saturating_sub(members);
            match n {
                0 => {
                    d.messages_missing += 1;
                    d.lost_whole += members;
                }
                n if n < members => d.lost_partial += members - n,
                _ => reach.saturating_record(worst * 1000),
            }
        }
    }
    d.reach_all = ReachAll {
        p50: reach.value_at_quantile(0.5),
        p99: reach.value_at_quantile(0.99),
        max: reach.max(),
        count: reach.len(),
    };
    d
}

/// The latency figures of a histogram of ns.
pub fn latency(h: &Histogram<u64>) -> Latency {
    Latency {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        count: h.len(),
    }
}

/// How much of what was lost barage's counters account for, in member-messages: a message
/// dropped by the room (`messages_dropped`) is lost to all its members, so as many wholly
/// missing messages as were counted dropped are accounted for; a frame dropped for one slow
/// connection (`frames_dropped`) carried at most `per_frame_max` messages, so partial losses
/// up to that many per dropped frame are. An estimate from above for partial losses.
pub fn counted(d: &Deliveries, c: &ServerCounters, members_per_message: f64, per_frame_max: u64) -> u64 {
    let whole = if c.messages_dropped >= d.messages_missing {
        d.lost_whole
    } else {
        (c.messages_dropped as f64 * members_per_message) as u64
    };
    let partial = d.lost_partial.min(c.frames_dropped.saturating_mul(per_frame_max.max(1)));
    whole.min(d.lost_whole) + partial
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mode = match (r.rate_target, r.window) {
        (Some(rate), _) => format!("rate {rate:.0}/s"),
        (_, Some(w)) => format!("saturate window {w}"),
        _ => String::new(),
    };
    let mut s = format!(
        "fanout {} {}{}: {} members in {} rooms, {mode}, {:.0} s window\n",
        r.kind,
        r.target,
        r.label.as_deref().map(|l| format!(" [{l}]")).unwrap_or_default(),
        r.members,
        r.rooms,
        r.duration_s
    );
    s += &format!(
        "  subscribed {}/{}  published {} ({:.0}/s)  delivered {} of {} expected, lost {}{}\n",
        r.subscribed,
        r.members,
        r.published,
        r.publish_rate,
        r.delivered,
        r.expected,
        r.lost,
        match r.server_dropped_counted {
            Some(c) => format!(" ({c} dropped by policy, counted; {} missing, uncounted)", r.lost - c.min(r.lost)),
            None => String::new(),
        }
    );
    s += &format!(
        "  deliveries/s {:.0}  frames/s {:.0}  messages/frame {:.2}  MB/s {:.1}\n",
        r.delivered_per_s,
        r.frames_per_s,
        r.messages_per_frame,
        r.bytes_per_s / 1e6
    );
    s += &format!(
        "  latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}  reach-all ms p50 {:.2} p99 {:.2} max {:.2}\n",
        ms(r.latency_ns.p50),
        ms(r.latency_ns.p90),
        ms(r.latency_ns.p99),
        ms(r.latency_ns.p999),
        ms(r.latency_ns.max),
        ms(r.reach_all_ns.p50),
        ms(r.reach_all_ns.p99),
        ms(r.reach_all_ns.max)
    );
    let opt = |v: Option<f64>, unit: &str| v.map(|v| format!("{v:.3}{unit}")).unwrap_or_else(|| "-".into());
    s += &format!(
        "  server CPU {}  per 1M deliveries {}  loadgen CPU {}\n",
        opt(r.server_cpu_s, " s"),
        opt(r.cpu_s_per_million_deliveries, " s"),
        opt(r.loadgen_cpu_s, " s")
    );
    let list = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    s += &format!("  publish errors: {}  errors: {}\n", list(&r.publish_errors), list(&r.errors));
    s += if r.passed { "  PASS" } else { "  FAIL" };
    if r.deadline_hit {
        s += " (deadline hit)";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout_book::Mode;
    use crate::fanout_msg::Streams;
    use std::sync::atomic::Ordering;

    #[test]
    fn deliveries_split_losses_and_time_those_that_reached_everyone() {
        // Two rooms of 2 and 1 members (3 members), one stream each.
        let book = Book::new(Streams { publishers: 1, rooms: 2 }, 3, Mode::Rate(10.0), 1.0, 0);
        for j in 0..2 {
            book.stream[j].published.store(4, Ordering::Release);
            book.start_measuring(j as u32, 0);
        }
        let mut counts = vec![0u32; book.tracked() as usize];
        let mut worst = vec![0u32; book.tracked() as usize];
        let (a, b) = (book.stream[0].offset as usize, book.stream[1].offset as usize);
        // Room 0: everyone, one partial, one missing, one duplicated.
        counts[a..a + 4].copy_from_slice(&[2, 1, 0, 3]);
        worst[a..a + 4].copy_from_slice(&[1000, 9, 0, 3000]);
        counts[b..b + 4].copy_from_slice(&[1, 1, 1, 0]);
        worst[b..b + 4].copy_from_slice(&[2000, 2000, 2000, 0]);
        let d = deliveries(&book, &counts, &worst);
        assert_eq!(d.expected, 4 * 2 + 4);
        assert_eq!(d.delivered, 2 + 1 + 2 + 3);
        assert_eq!(d.duplicates, 1);
        assert_eq!((d.lost_whole, d.lost_partial, d.messages_missing), (2 + 1, 1, 2));
        assert_eq!(d.expected - d.delivered, d.lost_whole + d.lost_partial);
        assert_eq!(d.reach_all.count, 5);
        assert!(d.reach_all.max >= 3_000_000 && d.reach_all.max < 3_010_000, "{}", d.reach_all.max);
    }

    #[test]
    fn counters_account_for_whole_and_partial_losses() {
        let d = Deliveries { lost_whole: 2000, messages_missing: 2, lost_partial: 50, ..Default::default() };
        let none = ServerCounters::default();
        assert_eq!(counted(&d, &none, 1000.0, 20), 0);
        let both = ServerCounters { messages_dropped: 2, frames_dropped: 3 };
        assert_eq!(counted(&d, &both, 1000.0, 20), 2050);
        let one = ServerCounters { messages_dropped: 1, frames_dropped: 1 };
        assert_eq!(counted(&d, &one, 1000.0, 20), 1000 + 20);
    }
}
