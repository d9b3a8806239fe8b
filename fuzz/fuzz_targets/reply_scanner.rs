//! The upstream reply scanner on arbitrary bytes: no panic, no end past the input, and
//! scanning in two reads finds the same end as scanning at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redfuse::resp::ReplyScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&knob, input)) = data.split_first() else {
        return;
    };
    let depth = usize::from(knob & 0x1f);
    let whole = ReplyScanner::new().scan(input, depth);
    if let Ok(Some(n)) = whole {
        assert!(n <= input.len());
    }
    let split = usize::from(knob >> 5) * input.len() / 7;
    let mut s = ReplyScanner::new();
    let first = s.scan(&input[..split], depth);
    match first {
        Ok(None) => {
            let resumed = s.scan(input, depth);
            match (&whole, &resumed) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => panic!("whole {whole:?}, resumed {resumed:?}"),
            }
        }
        // A frame (or an error) within the first read is a frame (or an error) of the whole.
        Ok(Some(n)) => assert!(matches!(whole, Ok(Some(m)) if m == n)),
        Err(_) => assert!(whole.is_err()),
    }
});
