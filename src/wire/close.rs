//! Close codes (RFC 6455 7.4): what a peer may put in a Close frame, and what we send in ours.

/// A WebSocket close status code. Written in decimal, as RFC 6455 7.4.1 and the IANA registry
/// name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL: Self = Self(1002);
    pub const UNSUPPORTED: Self = Self(1003);
    /// Bad payload data, e.g. text that is not UTF-8.
    pub const INVALID_DATA: Self = Self(1007);
    pub const POLICY: Self = Self(1008);
    pub const TOO_BIG: Self = Self(1009);
    pub const INTERNAL: Self = Self(1011);
    /// Registered after RFC 6455; we send it (overload), but do not accept it from a client.
    pub const TRY_AGAIN: Self = Self(1013);

    /// Whether a peer may send this code in a Close frame (RFC 6455 7.4: 1000-1003, 1007-1011,
    /// 3000-4999). 1004-1006 and 1015 are reserved for local use and never go on the wire.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_follows_rfc_6455_7_4() {
        let valid = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999];
        for code in valid {
            assert!(CloseCode(code).is_valid_on_wire(), "{code}");
        }
        let invalid = [0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 5000];
        for code in invalid {
            assert!(!CloseCode(code).is_valid_on_wire(), "{code}");
        }
    }

    #[test]
    fn named_codes_have_their_numbers() {
        assert_eq!(CloseCode::NORMAL.0, 1000);
        assert_eq!(CloseCode::PROTOCOL.0, 1002);
        assert_eq!(CloseCode::INVALID_DATA.0, 1007);
        assert_eq!(CloseCode::TOO_BIG.0, 1009);
        assert_eq!(CloseCode::TRY_AGAIN.0, 1013);
    }
}
