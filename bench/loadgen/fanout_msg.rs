//! What the `fanout` scenario sends and where: the server kinds it speaks to, the 24-byte header
//! every published message starts with, the publish streams (publisher × room) and the members
//! of each room, and the upgrade paths.
#![forbid(unsafe_code)]

/// Bytes of the header at the start of every published message:
/// `[u64 LE seq][u64 LE send CLOCK_MONOTONIC ns][u32 LE room][u32 LE publisher]`.
pub const HEADER_BYTES: usize = 24;

/// The server under test, which decides the paths and what a subscriber reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// barrage: `GET /ws?room=rK` (`barrage.v1.proto`), publish through the business API,
    /// messages arrive inside protobuf block frames.
    Barrage,
    /// A peer broadcast server: `GET {sub_path}?room=rK`, publish over `{pub_path}?room=rK`,
    /// each message one WebSocket frame.
    Broadcast,
    /// Nchan: `GET {sub_path}/rK`, publish over `{pub_path}/rK`, each message one frame.
    Nchan,
    /// Socket.IO v4 over WebSocket (`bench/peers/socketio`): `GET /socket.io/?EIO=4&
    /// transport=websocket&room=rK`, then `40` (connect); publish over `/pub?room=rK`; each
    /// message a text frame `42["m","#HEX..."]` (`Tagged`).
    SocketIo,
    /// The Pusher protocol (soketi): `GET /app/KEY?protocol=7`, then `pusher:subscribe` to rK;
    /// publish through the signed HTTP events API; each message a text frame
    /// `{"event":"m","channel":"rK","data":"#HEX..."}` (`Tagged`).
    Pusher,
}

/// The Pusher app the soketi runs are configured with (bench/cluster.sh passes the same).
pub const PUSHER_APP_ID: &str = "barrage";
pub const PUSHER_KEY: &str = "barrage-key";
pub const PUSHER_SECRET: &str = "barrage-secret";

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Barrage => "barrage",
            Kind::Broadcast => "broadcast",
            Kind::Nchan => "nchan",
            Kind::SocketIo => "socketio",
            Kind::Pusher => "pusher",
        }
    }

    /// Whether messages arrive as `#HEX` text inside the protocol's own envelope, a member
    /// counting as subscribed once the server has acknowledged twice (open + join).
    pub fn tagged(self) -> bool {
        matches!(self, Kind::SocketIo | Kind::Pusher)
    }

    /// The text a subscriber sends right after its upgrade request, if its protocol needs one
    /// to join room `k`.
    pub fn hello(self, k: u32) -> Option<String> {
        match self {
            Kind::SocketIo => Some("40".into()),
            Kind::Pusher => Some(format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{}"}}}}"#, room_name(k))),
            Kind::Barrage | Kind::Broadcast | Kind::Nchan => None,
        }
    }

    /// The subscriber's upgrade path for room `k`.
    pub fn sub_path(self, sub_path: &str, k: u32) -> String {
        match self {
            Kind::Barrage => format!("/ws?room={}", room_name(k)),
            Kind::Broadcast => format!("{sub_path}?room={}", room_name(k)),
            Kind::Nchan => format!("{}/{}", sub_path.trim_end_matches('/'), room_name(k)),
            Kind::SocketIo => format!("/socket.io/?EIO=4&transport=websocket&room={}", room_name(k)),
            Kind::Pusher => format!("/app/{PUSHER_KEY}?protocol=7&client=barrage-load&version=1"),
        }
    }

    /// The WebSocket publisher's upgrade path for room `k` (barrage publishes over HTTP).
    pub fn pub_path(self, pub_path: &str, k: u32) -> String {
        match self {
            Kind::Barrage => format!("/v1/rooms/{}/messages", room_name(k)),
            Kind::Broadcast => format!("{pub_path}?room={}", room_name(k)),
            Kind::Nchan => format!("{}/{}", pub_path.trim_end_matches('/'), room_name(k)),
            Kind::SocketIo => format!("/pub?room={}", room_name(k)),
            Kind::Pusher => format!("/apps/{PUSHER_APP_ID}/events"),
        }
    }
}

pub fn room_name(k: u32) -> String {
    format!("r{k}")
}

/// A published message's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The message's ordinal in its stream (publisher × room), from 0.
    pub seq: u64,
    pub send_ns: u64,
    pub room: u32,
    pub publisher: u32,
}

impl Header {
    pub fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.send_ns.to_le_bytes());
        out[16..20].copy_from_slice(&self.room.to_le_bytes());
        out[20..24].copy_from_slice(&self.publisher.to_le_bytes());
    }

    pub fn read(b: &[u8; HEADER_BYTES]) -> Header {
        let u64_at =
            |i: usize| u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { seq: u64_at(0), send_ns: u64_at(8), room: u32_at(16), publisher: u32_at(20) }
    }
}

/// A message of `bytes` bytes: the header, then filler.
pub fn message(h: &Header, bytes: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(bytes.max(HEADER_BYTES), b'.');
    h.write(&mut out[..HEADER_BYTES]);
}

/// The publish streams: one per (publisher, room) pair that publishes. There are
/// `max(publishers, rooms)` of them; stream `j` is publisher `j % P` into room `j % R`, so every
/// room has a stream and every publisher one at least.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streams {
    pub publishers: u32,
    pub rooms: u32,
}

impl Streams {
    pub fn count(&self) -> u32 {
        self.publishers.max(self.rooms)
    }

    /// (publisher, room) of stream `j`.
    pub fn of(&self, j: u32) -> (u32, u32) {
        (j % self.publishers, j % self.rooms)
    }

    /// The stream of `publisher` into `room`, if that pair publishes.
    pub fn id(&self, publisher: u32, room: u32) -> Option<u32> {
        if publisher >= self.publishers || room >= self.rooms {
            return None;
        }
        let j = if self.rooms >= self.publishers { room } else { publisher };
        (self.of(j) == (publisher, room)).then_some(j)
    }

    /// The streams into room `k`.
    pub fn in_room(&self, k: u32) -> impl Iterator<Item = u32> {
        (k..self.count()).step_by(self.rooms as usize)
    }

    /// The streams publisher `p` writes.
    pub fn of_publisher(&self, p: u32) -> impl Iterator<Item = u32> {
        (p..self.count()).step_by(self.publishers as usize)
    }

    /// Messages per second stream `j` publishes when `total` are published a second: the
    /// total is split evenly over rooms, a room's share evenly over its streams.
    pub fn rate_per_s(&self, j: u32, total: f64) -> f64 {
        let (_, k) = self.of(j);
        total / f64::from(self.rooms) / self.in_room(k).count() as f64
    }
}

/// Members of room `k` when member `i` of `members` is in room `i % rooms`.
pub fn members_in(k: u32, members: u64, rooms: u32) -> u64 {
    let r = u64::from(rooms);
    members / r + u64::from(u64::from(k) < members % r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header { seq: 0x0102_0304_0506_0708, send_ns: 42, room: 7, publisher: 0xAABB_CCDD };
        let mut m = Vec::new();
        message(&h, 100, &mut m);
        assert_eq!(m.len(), 100);
        assert_eq!(&m[..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&m[16..20], &[7, 0, 0, 0]);
        assert!(m[24..].iter().all(|&b| b == b'.'));
        assert_eq!(Header::read(m[..24].try_into().unwrap()), h);
        message(&h, 3, &mut m);
        assert_eq!(m.len(), HEADER_BYTES, "a message always holds the header");
    }

    #[test]
    fn every_room_and_publisher_has_a_stream_and_ids_invert_of() {
        for (p, r) in [(1, 1), (2, 1), (1, 3), (2, 3), (3, 2), (2, 4), (4, 2), (5, 7)] {
            let s = Streams { publishers: p, rooms: r };
            assert_eq!(s.count(), p.max(r));
            for j in 0..s.count() {
                let (pj, kj) = s.of(j);
                assert_eq!(s.id(pj, kj), Some(j), "{p}x{r} stream {j}");
            }
            for k in 0..r {
                assert!(s.in_room(k).count() >= 1);
                assert!(s.in_room(k).all(|j| s.of(j).1 == k));
            }
            for q in 0..p {
                assert!(s.of_publisher(q).count() >= 1);
                assert!(s.of_publisher(q).all(|j| s.of(j).0 == q));
            }
            let total: f64 = (0..s.count()).map(|j| s.rate_per_s(j, 1000.0)).sum();
            assert!((total - 1000.0).abs() < 1e-6, "{p}x{r}: {total}");
            for k in 0..r {
                let room: f64 = s.in_room(k).map(|j| s.rate_per_s(j, 1000.0)).sum();
                assert!((room - 1000.0 / f64::from(r)).abs() < 1e-6);
            }
        }
        let s = Streams { publishers: 2, rooms: 3 };
        assert_eq!(s.id(1, 0), None);
        assert_eq!(s.id(2, 0), None);
        assert_eq!(s.id(0, 3), None);
    }

    #[test]
    fn members_split_like_i_mod_r() {
        for (m, r) in [(10, 3), (500, 2), (7, 7), (5, 1)] {
            let counted: Vec<u64> =
                (0..r).map(|k| (0..m).filter(|i| i % u64::from(r) == u64::from(k)).count() as u64).collect();
            let computed: Vec<u64> = (0..r).map(|k| members_in(k, m, r)).collect();
            assert_eq!(counted, computed);
        }
    }

    #[test]
    fn paths_per_kind() {
        assert_eq!(Kind::Barrage.sub_path("/sub", 3), "/ws?room=r3");
        assert_eq!(Kind::Broadcast.sub_path("/sub", 0), "/sub?room=r0");
        assert_eq!(Kind::Broadcast.pub_path("/pub", 1), "/pub?room=r1");
        assert_eq!(Kind::Nchan.sub_path("/sub/", 2), "/sub/r2");
        assert_eq!(Kind::Nchan.pub_path("/pub", 2), "/pub/r2");
        assert_eq!(Kind::Barrage.pub_path("/pub", 9), "/v1/rooms/r9/messages");
    }
}
