//! routes.toml parser and validator: any text is accepted or refused with diagnostics, never a
//! panic; whatever is accepted survives the wire (encode, then the agent's re-checking decode).
#![no_main]

use dispa_proto::config::Attachments;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A JWKS file so `jwks_file = "jwks.json"` gets past "not uploaded".
    let mut files = Attachments::default();
    files.0.insert(
        "jwks.json".into(),
        bytes::Bytes::from_static(br#"{"keys":[]}"#),
    );
    if let Ok(config) = dispa_proto::config::parse_with_files("fuzz.toml", text, &files) {
        let encoded = dispa_proto::config::wire::encode(&config);
        let decoded = dispa_proto::config::wire::decode(&encoded);
        assert!(decoded.is_ok(), "a validated config must survive the wire: {decoded:?}");
    }
});
