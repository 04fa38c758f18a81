//! A record's headers as the broker sends them (record format v2), read in place: no
//! allocation, no copy. The bytes are what librdkafka keeps of a fetched record until it is
//! asked to parse them ([`crate::RawMessage::last_header`]).
//!
//! The framing, all lengths zig-zag varints: a header count, then each header's name length
//! and name, then its value length (-1 for a null value) and value. Whatever librdkafka's own
//! parse (`rd_kafka_msg_headers_parse`) refuses is refused here too, so that both give the
//! same answer: a count above 100,000, a length that runs past the end or is negative (other
//! than a null value's -1), a varint cut short.

/// The most headers librdkafka parses in one record; a record claiming more has none.
const MAX_HEADERS: i64 = 100_000;

/// Bytes read from the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A zig-zag varint of at most 10 bytes (any 64-bit value); `None` when cut short or longer.
    fn varint(&mut self) -> Option<i64> {
        let mut raw = 0u64;
        for (i, byte) in self.0.iter().take(10).enumerate() {
            raw |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                // zig-zag: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...; the cast keeps the bits
                #[allow(clippy::cast_possible_wrap)]
                return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
            }
        }
        None
    }

    /// The next `len` bytes; `None` for a negative length or one past the end.
    fn bytes(&mut self, len: i64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }
}

/// The value of the last header called `name` in `headers` (`Some(&[])` for a null value, as
/// [`crate::RawHeaders::last`] gives it); `None` when there is none, or when the headers are
/// malformed anywhere (librdkafka then has no headers for the record at all).
pub fn last_header<'a>(headers: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    if headers.is_empty() {
        return None;
    }
    let mut r = Reader(headers);
    let count = r.varint()?;
    if !(1..=MAX_HEADERS).contains(&count) {
        return None;
    }
    let mut found = None;
    for _ in 0..count {
        let key_len = r.varint()?;
        let key = r.bytes(key_len)?;
        let value = match r.varint()? {
            -1 => &[][..],
            len => r.bytes(len)?,
        };
        if key == name {
            found = Some(value);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn varint(out: &mut Vec<u8>, v: i64) {
        // zig-zag, then 7 bits a byte, low first; the casts keep the bits
        #[allow(clippy::cast_sign_loss)]
        let mut raw = ((v << 1) ^ (v >> 63)) as u64;
        while raw >= 0x80 {
            #[allow(clippy::cast_possible_truncation)]
            out.push((raw as u8) | 0x80);
            raw >>= 7;
        }
        #[allow(clippy::cast_possible_truncation)]
        out.push(raw as u8);
    }

    /// The wire form of `headers` (a `None` value is a null one).
    fn encode(headers: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, i64::try_from(headers.len()).unwrap());
        for (k, v) in headers {
            varint(&mut out, i64::try_from(k.len()).unwrap());
            out.extend_from_slice(k);
            match v {
                None => varint(&mut out, -1),
                Some(v) => {
                    varint(&mut out, i64::try_from(v.len()).unwrap());
                    out.extend_from_slice(v);
                }
            }
        }
        out
    }

    #[test]
    fn the_last_header_of_a_name_is_found_and_null_values_read_empty() {
        let long = vec![b'x'; 300]; // a two-byte length
        let h = encode(&[
            (b"traceparent", Some(b"first")),
            (b"n", None),
            (b"", Some(b"unnamed")),
            (b"big", Some(&long)),
            (b"traceparent", Some(b"last")),
            (b"empty", Some(b"")),
            (b"\xff\xfe", Some(b"not utf-8")),
        ]);
        assert_eq!(last_header(&h, b"traceparent"), Some(&b"last"[..]));
        assert_eq!(last_header(&h, b"n"), Some(&[][..]));
        assert_eq!(last_header(&h, b"empty"), Some(&[][..]));
        assert_eq!(last_header(&h, b""), Some(&b"unnamed"[..]));
        assert_eq!(last_header(&h, b"big"), Some(&long[..]));
        assert_eq!(last_header(&h, b"\xff\xfe"), Some(&b"not utf-8"[..]));
        // names match whole and in their own case
        assert_eq!(last_header(&h, b"Traceparent"), None);
        assert_eq!(last_header(&h, b"trace"), None);
        assert_eq!(last_header(&h, b"missing"), None);
        // bytes after the last counted header are not looked at
        let mut trailing = encode(&[(b"a", Some(b"1"))]);
        trailing.extend_from_slice(b"\x02\x01b");
        assert_eq!(last_header(&trailing, b"a"), Some(&b"1"[..]));
        assert_eq!(last_header(&trailing, b"b"), None);
    }

    #[test]
    fn malformed_or_empty_headers_have_no_header_at_all() {
        let good = encode(&[(b"a", Some(b"1")), (b"b", Some(b"22"))]);
        assert_eq!(last_header(&good, b"a"), Some(&b"1"[..]));
        // cut short anywhere: librdkafka then refuses the whole parse, the match before it too
        for end in 0..good.len() {
            assert_eq!(last_header(&good[..end], b"a"), None, "cut at {end}");
        }
        let mut none = Vec::new();
        varint(&mut none, 0);
        assert_eq!(last_header(&none, b"a"), None, "a count of 0");
        let mut negative = Vec::new();
        varint(&mut negative, -1);
        assert_eq!(last_header(&negative, b"a"), None, "a negative count");
        let mut too_many = Vec::new();
        varint(&mut too_many, MAX_HEADERS + 1);
        too_many.extend(encode(&[(b"a", Some(b"1"))]).into_iter().skip(1));
        assert_eq!(
            last_header(&too_many, b"a"),
            None,
            "over librdkafka's limit"
        );
        // a negative length other than a null value's -1, for a value and for a name
        let mut bad_value = Vec::new();
        varint(&mut bad_value, 1); // one header
        varint(&mut bad_value, 1); // its name, "a"
        bad_value.push(b'a');
        varint(&mut bad_value, -2);
        assert_eq!(last_header(&bad_value, b"a"), None, "a value length of -2");
        let mut bad_key = Vec::new();
        varint(&mut bad_key, 1);
        varint(&mut bad_key, -1);
        varint(&mut bad_key, 0);
        assert_eq!(last_header(&bad_key, b""), None, "a name length of -1");
        // a varint that never ends
        assert_eq!(last_header(&[0xff; 12], b"a"), None);
    }

    #[test]
    fn varints_read_as_the_broker_writes_them() {
        for v in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i64::from(i32::MAX),
            i64::MIN,
            i64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            let mut r = Reader(&out);
            assert_eq!(r.varint(), Some(v), "{v}");
            assert!(r.0.is_empty(), "{v} read whole");
        }
    }
}
