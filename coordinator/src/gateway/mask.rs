//! PII masking: e-mail addresses, phone numbers (mainland-China mobiles
//! with or without +86, and international and North-American formats),
//! bank cards (13 to 19 digits, Luhn-checked), IBANs (mod-97 checked), IPv4
//! and IPv6 addresses, PRC resident ID numbers (18 digits with their check
//! digit) and US social security numbers, replaced by `[EMAIL]`, `[PHONE]`,
//! `[CARD]`, `[IBAN]`, `[IP]`, `[ID]`.
//!
//! A streamed answer is masked as it goes ([`StreamMasker`]): the last
//! [`HOLD`] bytes are held back until more text shows whether they begin
//! a value, so a card number or an e-mail split over chunks is masked
//! whole. The cost is that much delay on the stream; a value longer than
//! [`HOLD`] bytes (an e-mail address of 100 characters) may escape it.

use std::sync::{Arc, OnceLock};

use regex::Regex;

use super::filter::Filters;

/// Bytes of a stream held back until the text after them is known.
pub const HOLD: usize = 96;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Email,
    Phone,
    Card,
    Iban,
    Ip,
    Id,
    /// What a tenant's mask filter matched.
    Filtered,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Email => "[EMAIL]",
            Kind::Phone => "[PHONE]",
            Kind::Card => "[CARD]",
            Kind::Iban => "[IBAN]",
            Kind::Ip => "[IP]",
            Kind::Id => "[ID]",
            Kind::Filtered => "[FILTERED]",
        }
    }
}

struct Detector {
    kind: Kind,
    re: Regex,
    valid: fn(&str) -> bool,
}

fn any(_: &str) -> bool {
    true
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// The Luhn check of a card number.
pub fn luhn(s: &str) -> bool {
    let d = digits(s);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The check digit of an 18-digit PRC resident ID (GB 11643).
pub fn prc_id(s: &str) -> bool {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = s.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(W)
        .map(|(c, w)| u32::from(c - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == b[17].to_ascii_uppercase()
}

/// The ISO 13616 mod-97 check of an IBAN.
pub fn iban(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for &c in tail.iter().chain(head) {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn detectors() -> &'static [Detector] {
    static D: OnceLock<Vec<Detector>> = OnceLock::new();
    D.get_or_init(|| {
        let d = |kind, pattern: &str, valid| Detector {
            kind,
            re: Regex::new(pattern).expect("a PII pattern compiles"),
            valid,
        };
        vec![
            d(Kind::Email, r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}", any),
            d(Kind::Id, r"\b\d{17}[\dXx]\b", prc_id),
            d(Kind::Iban, r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", iban),
            d(Kind::Card, r"\b\d(?:[ \-]?\d){12,18}\b", luhn),
            d(Kind::Phone, r"(?:\+86[ \-]?)?\b1[3-9]\d(?:[ \-]?\d{4}){2}\b", any),
            d(Kind::Phone, r"\+\d{1,3}[ \-.]?\(?\d{1,4}\)?(?:[ \-.]?\d{2,4}){2,4}\b", any),
            d(Kind::Phone, r"(?:\(\d{3}\)\s?|\b\d{3}[\-.])\d{3}[\-.]\d{4}\b", any),
            d(Kind::Id, r"\b\d{3}-\d{2}-\d{4}\b", any),
            d(
                Kind::Ip,
                r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
                any,
            ),
            d(
                Kind::Ip,
                r"(?i)\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|\b(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4}\b|\b(?:[0-9a-f]{1,4}:){1,7}:",
                any,
            ),
        ]
    })
}

/// Every PII value in `text`: byte ranges and kinds, in order, not
/// overlapping (the earlier, then the longer, wins).
pub fn find(text: &str) -> Vec<(usize, usize, Kind)> {
    find_with(text, true, None)
}

/// [`find`] with PII on or off and a tenant's mask filters.
pub fn find_with(text: &str, pii: bool, filters: Option<&Filters>) -> Vec<(usize, usize, Kind)> {
    let mut found: Vec<(usize, usize, Kind)> = Vec::new();
    if pii {
        for d in detectors() {
            for m in d.re.find_iter(text) {
                if (d.valid)(m.as_str()) {
                    found.push((m.start(), m.end(), d.kind));
                }
            }
        }
    }
    if let Some(f) = filters {
        found.extend(
            f.masked(text)
                .into_iter()
                .map(|(s, e)| (s, e, Kind::Filtered)),
        );
    }
    found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out: Vec<(usize, usize, Kind)> = Vec::new();
    for f in found {
        if out.last().is_none_or(|last| f.0 >= last.1) {
            out.push(f);
        }
    }
    out
}

/// `text` with every PII value replaced by its label.
pub fn mask(text: &str) -> String {
    mask_until(text, &find(text), text.len()).0
}

/// [`mask`] with PII on or off and a tenant's mask filters.
pub fn mask_with(text: &str, pii: bool, filters: Option<&Filters>) -> String {
    mask_until(text, &find_with(text, pii, filters), text.len()).0
}

/// Masks `text[..cut]` with `found` (which may reach past `cut`); the
/// masked part and where it really ended (before any value that crosses
/// `cut`).
fn mask_until(text: &str, found: &[(usize, usize, Kind)], cut: usize) -> (String, usize) {
    let mut cut = cut;
    if let Some(&(s, _, _)) = found.iter().find(|(s, e, _)| *s < cut && *e > cut) {
        cut = s;
    }
    let mut out = String::with_capacity(cut);
    let mut at = 0;
    for &(s, e, kind) in found.iter().filter(|(_, e, _)| *e <= cut) {
        out.push_str(&text[at..s]);
        out.push_str(kind.label());
        at = e;
    }
    out.push_str(&text[at..cut]);
    (out, cut)
}

/// Masks a text that arrives in pieces (and watches it for a tenant's
/// block filters).
pub struct StreamMasker {
    held: String,
    pii: bool,
    filters: Option<Arc<Filters>>,
    blocked: bool,
}

impl Default for StreamMasker {
    fn default() -> Self {
        StreamMasker::new(true, None)
    }
}

impl StreamMasker {
    pub fn new(pii: bool, filters: Option<Arc<Filters>>) -> StreamMasker {
        StreamMasker {
            held: String::new(),
            pii,
            filters,
            blocked: false,
        }
    }

    /// Whether the text came to match a block filter: send nothing more.
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    fn check_blocked(&mut self) -> bool {
        if let Some(f) = &self.filters {
            if f.blocked(&self.held).is_some() {
                self.blocked = true;
                self.held.clear();
            }
        }
        self.blocked
    }

    /// Takes the next piece; what can be sent now, masked.
    pub fn push(&mut self, piece: &str) -> String {
        if self.blocked {
            return String::new();
        }
        self.held.push_str(piece);
        // every byte is held until HOLD bytes follow it, so a blocked
        // phrase up to HOLD bytes long is seen whole before any of it goes
        if self.check_blocked() {
            return String::new();
        }
        if self.held.len() <= HOLD {
            return String::new();
        }
        let mut cut = self.held.len() - HOLD;
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        // never cut inside a word: a value may be growing there
        cut = self.held[..cut]
            .rfind(char::is_whitespace)
            .map_or(0, |i| i + 1);
        if cut == 0 {
            return String::new();
        }
        let found = find_with(&self.held, self.pii, self.filters.as_deref());
        let (out, cut) = mask_until(&self.held, &found, cut);
        self.held.drain(..cut);
        out
    }

    /// The rest, masked, when the stream ends.
    pub fn finish(&mut self) -> String {
        if self.check_blocked() {
            return String::new();
        }
        let rest = std::mem::take(&mut self.held);
        mask_with(&rest, self.pii, self.filters.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &[(&str, &str)] = &[
        ("mail alice.smith+x@example.co.uk now", "mail [EMAIL] now"),
        (
            "call 13812345678 or +86 138 1234 5678",
            "call [PHONE] or [PHONE]",
        ),
        ("office +44 20 7946 0958.", "office [PHONE]."),
        (
            "us (415) 555-2671 and 415-555-2671",
            "us [PHONE] and [PHONE]",
        ),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        (
            "card 4111-1111-1111-1112 is not one",
            "card 4111-1111-1111-1112 is not one",
        ),
        ("iban GB82 WEST 1234 5698 7654 32 end", "iban [IBAN] end"),
        ("iban DE89370400440532013000", "iban [IBAN]"),
        (
            "bad iban GB82WEST12345698765433",
            "bad iban GB82WEST12345698765433",
        ),
        (
            "from 192.168.1.20 and 2001:db8::8a2e:370:7334",
            "from [IP] and [IP]",
        ),
        ("id 11010519491231002X here", "id [ID] here"),
        (
            "id 110105194912310021 is wrong",
            "id 110105194912310021 is wrong",
        ),
        ("ssn 078-05-1120", "ssn [ID]"),
        (
            "version 1.2.3 of 2024 costs 42",
            "version 1.2.3 of 2024 costs 42",
        ),
    ];

    #[test]
    fn each_kind_is_masked_and_lookalikes_are_not() {
        for (text, want) in SAMPLES {
            assert_eq!(mask(text), *want, "{text}");
        }
    }

    #[test]
    fn checks() {
        assert!(luhn("4111111111111111") && !luhn("4111111111111112"));
        assert!(prc_id("11010519491231002X") && !prc_id("110105194912310021"));
        assert!(iban("GB82WEST12345698765432") && !iban("GB82WEST12345698765433"));
    }

    /// Every split of a text into pieces masks the same as the whole.
    #[test]
    fn values_straddling_chunks_are_masked_whole() {
        let text: String = SAMPLES
            .iter()
            .map(|(t, _)| *t)
            .collect::<Vec<_>>()
            .join(" | ");
        let whole = mask(&text);
        for size in [1, 2, 3, 5, 7, 11, 64, 200] {
            let mut m = StreamMasker::default();
            let mut out = String::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                out.push_str(&m.push(&piece.iter().collect::<String>()));
            }
            out.push_str(&m.finish());
            assert_eq!(out, whole, "pieces of {size}");
        }
        assert!(!whole.contains("4111 1111"), "{whole}");
    }
}
