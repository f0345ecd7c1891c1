//! Datagrams as the CoAP endpoint receives them: the CoAP parse, the registration interface
//! (`protocol::lwm2m::registration`), the Block2 option of a firmware block request and the block it
//! names, and what the endpoint reads from device answers (a PCP frame in a notification, resource values
//! in a read answer, the firmware version string) must never panic.
#![no_main]

use coap_lite::{CoapOption, MessageClass, Packet};
use libfuzzer_sys::fuzz_target;
use protocol::{lwm2m, pcp};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::from_bytes(data) else {
        return;
    };
    match packet.header.code {
        MessageClass::Request(_) => {
            let _ = lwm2m::registration(&packet);
            if let Some(Ok(block)) = packet
                .get_first_option(CoapOption::Block2)
                .map(|v| lwm2m::Block::decode(v))
            {
                let _ = lwm2m::Block::slice(block.num, block.szx, 30_000);
                let _ = block.encode();
            }
        }
        MessageClass::Response(_) => {
            if let Ok(frame) = pcp::decode_exact(&packet.payload) {
                let _ = pcp::Uplink::parse(&frame);
            }
            let format = packet
                .get_first_option(CoapOption::ContentFormat)
                .map_or(0, |v| {
                    v.iter().fold(0u16, |acc, b| (acc << 8) | u16::from(*b))
                });
            let _ = lwm2m::integer_resources(format, &packet.payload, Some(8));
            let _ = lwm2m::string_resource(format, &packet.payload, 3);
        }
        _ => {}
    }
});
