//! Readings from outside the load: memory and CPU time from /proc (the gateway's RSS, the
//! kernel's slab, our own RSS, a process's utime + stime), and the gateway's business API over
//! plain blocking HTTP/1.1 (room online counts, publishing the probe message, metrics).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

const API_TIMEOUT: Duration = Duration::from_secs(5);
/// A response larger than this is not the gateway's small JSON.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

/// Memory figures at one moment, in bytes; None when unreadable (or no gateway pid given).
#[derive(Clone, Copy, Debug, Default)]
pub struct Readings {
    pub gateway_rss: Option<u64>,
    pub slab: Option<u64>,
    pub sunreclaim: Option<u64>,
    pub own_rss: Option<u64>,
}

impl Readings {
    pub fn now(gateway_pid: Option<u32>) -> Readings {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Readings {
            gateway_rss: gateway_pid.and_then(|pid| rss_bytes(&format!("/proc/{pid}/status"))),
            slab: kb_field(&meminfo, "Slab:"),
            sunreclaim: kb_field(&meminfo, "SUnreclaim:"),
            own_rss: rss_bytes("/proc/self/status"),
        }
    }
}

/// VmRSS of a /proc/PID/status file.
pub fn rss_bytes(path: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string(path).ok()?, "VmRSS:")
}

/// CPU time (utime + stime, all threads) of the process whose stat file is `path`
/// (`/proc/PID/stat`, `/proc/self/stat`), in seconds.
pub fn cpu_s(path: &str) -> Option<f64> {
    let ticks = stat_cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    Some(ticks as f64 / crate::sys::clock_ticks_per_s() as f64)
}

/// CPU time of process `pid` and of its children (nginx's workers are child processes), in
/// seconds; None if `pid` itself cannot be read. A child that exits in between takes its time
/// with it.
pub fn tree_cpu_s(pid: u32) -> Option<f64> {
    let mut ticks = stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        if stat_ppid(&stat) == Some(pid) {
            ticks += stat_cpu_ticks(&stat).unwrap_or(0);
        }
    }
    Some(ticks as f64 / crate::sys::clock_ticks_per_s() as f64)
}

/// Field 4 (the parent's pid) of a stat line.
fn stat_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Fields 14 and 15 of a stat line, counted after the `)` that ends the command name (which
/// may hold spaces and parentheses).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first word, so fields 14 and 15 are words 11 and 12.
    let mut words = rest.split_whitespace().skip(11);
    let utime: u64 = words.next()?.parse().ok()?;
    let stime: u64 = words.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The sum of every sample of the Prometheus series `name` (whatever its labels).
pub fn series_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// `Name:   1234 kB` → 1234 × 1024.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// Why an API call did not get an answer.
#[derive(Debug)]
pub enum ApiError {
    Io(std::io::Error),
    /// Not an HTTP response, or not the JSON expected.
    Malformed,
}

impl ApiError {
    /// A stable name for the error counts.
    pub fn kind(&self) -> String {
        match self {
            ApiError::Io(e) => match e.raw_os_error() {
                Some(n) => format!("api_{}", crate::errors::errno_name(n)),
                None => format!("api_{:?}", e.kind()).to_lowercase(),
            },
            ApiError::Malformed => "api_malformed".into(),
        }
    }
}

/// The gateway's business API.
pub struct Api {
    pub addr: SocketAddrV4,
    pub key: String,
}

impl Api {
    /// `GET /v1/rooms/{room}` → its `online` count.
    pub fn online(&self, room: &str) -> Result<u64, ApiError> {
        let (status, body) = self.call("GET", &format!("/v1/rooms/{room}"), "")?;
        if status != 200 {
            return Err(ApiError::Malformed);
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| ApiError::Malformed)?;
        v["online"].as_u64().ok_or(ApiError::Malformed)
    }

    /// `POST /v1/rooms/{room}/messages` with a JSON body; returns the status.
    pub fn publish(&self, room: &str, body: &str) -> Result<u16, ApiError> {
        Ok(self.call("POST", &format!("/v1/rooms/{room}/messages"), body)?.0)
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ApiError> {
        match self.call("GET", "/metrics", "")? {
            (200, body) => Ok(body),
            _ => Err(ApiError::Malformed),
        }
    }

    /// One request on its own connection (`Connection: close`); returns (status, body).
    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), ApiError> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(self.addr), API_TIMEOUT).map_err(ApiError::Io)?;
        s.set_read_timeout(Some(API_TIMEOUT)).map_err(ApiError::Io)?;
        s.set_write_timeout(Some(API_TIMEOUT)).map_err(ApiError::Io)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        if !self.key.is_empty() {
            req.push_str(&format!("X-Api-Key: {}\r\n", self.key));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).map_err(ApiError::Io)?;
        let mut out = Vec::new();
        s.take(RESPONSE_BYTES_MAX).read_to_end(&mut out).map_err(ApiError::Io)?;
        parse_response(&out).ok_or(ApiError::Malformed)
    }
}

/// `HTTP/1.1 NNN ...\r\n...\r\n\r\nbody` → (NNN, body).
fn parse_response(bytes: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut first = head.lines().next()?.split_whitespace();
    if !first.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = first.next()?.parse().ok()?;
    Some((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let meminfo = "MemTotal:       24000000 kB\nSlab:             123456 kB\nSUnreclaim:        65432 kB\n";
        assert_eq!(kb_field(meminfo, "Slab:"), Some(123456 * 1024));
        assert_eq!(kb_field(meminfo, "SUnreclaim:"), Some(65432 * 1024));
        assert_eq!(kb_field(meminfo, "Missing:"), None);
        assert_eq!(kb_field("VmRSS:\t  2048 kB\n", "VmRSS:"), Some(2048 * 1024));
        assert_eq!(kb_field("VmRSS: 12 MB\n", "VmRSS:"), None);
    }

    #[test]
    fn own_readings_are_there() {
        let r = Readings::now(Some(std::process::id()));
        assert!(r.own_rss.unwrap() > 0);
        assert!(r.gateway_rss.unwrap() > 0);
        assert!(r.slab.unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_come_after_the_name() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 99";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
        assert_eq!(stat_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(stat_ppid(stat), Some(1));
        assert!(cpu_s("/proc/self/stat").is_some());
        let own = cpu_s("/proc/self/stat").unwrap();
        assert!(tree_cpu_s(std::process::id()).unwrap() >= own);
    }

    #[test]
    fn series_sum_adds_every_label_set() {
        let text = "# HELP barrage_messages_dropped_total x\n\
            barrage_messages_dropped_total{shard=\"0\",reason=\"overflow\"} 3\n\
            barrage_messages_dropped_total{shard=\"1\",reason=\"expired\"} 4\n\
            barrage_messages_dropped_totally 100\n\
            barrage_frames_dropped_total{shard=\"0\",reason=\"slow_consumer\"} 2\n";
        assert_eq!(series_sum(text, "barrage_messages_dropped_total"), 7);
        assert_eq!(series_sum(text, "barrage_frames_dropped_total"), 2);
        assert_eq!(series_sum(text, "missing"), 0);
    }

    #[test]
    fn parses_responses() {
        let r = b"HTTP/1.1 202 Accepted\r\nContent-Length: 9\r\n\r\n{\"id\":1}\n";
        assert_eq!(parse_response(r), Some((202, "{\"id\":1}\n".into())));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parse_response(b"SSH-2.0\r\n\r\n"), None);
    }
}
