//! PCP frames from anywhere: decoding a stream frame by frame, and reading each frame as either
//! direction's message, must never panic; every message read encodes back to a valid frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::pcp::{self, Decoded, Downlink, Uplink};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Frame { frame, len }) = pcp::decode(rest) {
        if let Ok(up) = Uplink::parse(&frame) {
            let again = up.encode();
            assert_eq!(
                pcp::decode_exact(&again).map(|f| Uplink::parse(&f)),
                Ok(Ok(up))
            );
        }
        if let Ok(down) = Downlink::parse(&frame) {
            assert!(pcp::decode_exact(&down.encode()).is_ok());
        }
        rest = &rest[len..];
    }
    let _ = pcp::decode_exact(data);
});
