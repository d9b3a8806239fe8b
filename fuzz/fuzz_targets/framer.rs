//! The client request framer on arbitrary bytes: no panic; every way of cutting the input
//! into reads gives the same requests as reading it whole; nothing is reserved from a
//! declared length; and a request's raw bytes are exactly the bytes it was read from.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use redfuse::resp::request::{Framer, Peer};
use redfuse::resp::{Limits, parse_request};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size and the peer; the rest is the stream.
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(knob & 0x3f) + 1;
    let peer = if knob & 0x40 == 0 {
        Peer::Authenticated
    } else {
        Peer::Unauthenticated
    };
    let limits = Limits {
        max_bulk_len: 1 << 20,
        ..Limits::default()
    };

    // Whole.
    let mut buf = BytesMut::from(input);
    let mut framer = Framer::new();
    let mut whole = Vec::new();
    let whole_err = loop {
        match framer.next(&mut buf, &limits, peer) {
            Ok(Some(r)) => whole.push((r.raw, r.args)),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    // In reads of `chunk` bytes, checking that nothing is reserved.
    let mut framer = Framer::new();
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    let mut chunked_err = false;
    'reads: for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let capacity = buf.capacity();
            let r = framer.next(&mut buf, &limits, peer);
            assert!(buf.capacity() <= capacity, "the framer reserved");
            assert!(framer.partial_len() <= buf.len());
            match r {
                Ok(Some(r)) => chunked.push((r.raw, r.args)),
                Ok(None) => break,
                Err(_) => {
                    chunked_err = true;
                    break 'reads;
                }
            }
        }
    }
    assert_eq!(whole, chunked);
    assert_eq!(whole_err, chunked_err);

    // Every multibulk request read is itself one complete frame with the same arguments.
    for (raw, args) in &whole {
        if raw.first() == Some(&b'*') && peer == Peer::Authenticated {
            let mut again = BytesMut::from(&raw[..]);
            let r = parse_request(&mut again, &limits).unwrap().unwrap();
            assert_eq!(&r.args, args);
            assert!(again.is_empty());
        }
    }
});
