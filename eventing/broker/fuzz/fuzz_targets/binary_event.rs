//! Binary mode: any `ce-` headers and body. The ingress never panics, and what it accepts survives
//! the log and delivery unchanged.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Message<'a> {
    /// Header names get `ce-` in front when the flag is set, so most inputs look like events.
    headers: Vec<(bool, &'a [u8], &'a [u8])>,
    body: &'a [u8],
}

fuzz_target!(|message: Message<'_>| {
    let mut headers = HeaderMap::new();
    for (prefixed, name, value) in message.headers {
        let name = if prefixed {
            [b"ce-".as_slice(), name].concat()
        } else {
            name.to_vec()
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    sluice_broker_fuzz::check_message(&headers, message.body);
});
