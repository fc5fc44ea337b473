//! Priority buckets of room messages: whitelist > high > low. Parsed once where a message
//! enters (an API body, a protobuf publish, the config's type defaults); the mixer, the
//! shedding classes and the blocks work with this enum, and the wire field is written from it.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use crate::proto;

/// A priority bucket. Ordered: `Low < High < Whitelist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Cheap and stale fast: chat, likes, presence. Dropped first.
    #[default]
    Low,
    /// Beats low: gifts, PK scores.
    High,
    /// Never expired, never dropped: carried to the next block when a block is full.
    Whitelist,
}

impl Priority {
    /// From the protobuf enum value; None for a value the schema does not define.
    pub fn from_wire(value: i32) -> Option<Priority> {
        match proto::Priority::try_from(value).ok()? {
            proto::Priority::Low => Some(Priority::Low),
            proto::Priority::High => Some(Priority::High),
            proto::Priority::Whitelist => Some(Priority::Whitelist),
        }
    }

    /// From its name in any case (`low`, `HIGH`, `Whitelist`).
    pub fn parse(name: &str) -> Option<Priority> {
        match name.to_ascii_lowercase().as_str() {
            "low" => Some(Priority::Low),
            "high" => Some(Priority::High),
            "whitelist" => Some(Priority::Whitelist),
            _ => None,
        }
    }

    /// The protobuf enum value carried in `Message.priority`.
    pub fn wire(self) -> i32 {
        match self {
            Priority::Low => proto::Priority::Low as i32,
            Priority::High => proto::Priority::High as i32,
            Priority::Whitelist => proto::Priority::Whitelist as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_unknown_ones_are_refused() {
        for p in [Priority::Low, Priority::High, Priority::Whitelist] {
            assert_eq!(Priority::from_wire(p.wire()), Some(p));
        }
        assert_eq!(Priority::from_wire(3), None);
        assert_eq!(Priority::from_wire(-1), None);
        assert_eq!(Priority::parse("HIGH"), Some(Priority::High));
        assert_eq!(Priority::parse("urgent"), None);
        assert!(Priority::Low < Priority::High && Priority::High < Priority::Whitelist);
    }
}
