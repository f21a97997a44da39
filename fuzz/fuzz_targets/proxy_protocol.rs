//! The PROXY protocol v1/v2 parser: total over any bytes, never claims more than it was given,
//! and a complete header parses the same with trailing bytes after it.
#![no_main]

use dispa_agent::conn::proxy_protocol::{Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete { len, source }) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Parsed::Complete { len, source }));
    }
});
