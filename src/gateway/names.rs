//! The mesh endpoint's names: `{service}__{name}` for tools and prompts,
//! `{service}__{uri}` for resource URIs and templates.
//!
//! Service names may contain `_`, so a plain `{service}__` prefix would be
//! ambiguous (`a__b` + `c` and `a` + `b__c` both give `a__b__c`). The service
//! part is therefore escaped: each `_` in it is written `_0`. An escaped
//! service never contains `__` and never ends with `_`, so the first `__` of
//! an exposed name is always the separator and decoding is unique. Names of
//! services without `_` (the usual case) read as-is: `time__get_current_time`.
//! Only `[A-Za-z0-9_-]` are added, all valid tool-name characters.

use crate::model::validate_name;

const SEP: &str = "__";

/// The exposed form of `inner` from `service`.
pub fn encode(service: &str, inner: &str) -> String {
    let mut s = String::with_capacity(service.len() + 2 + inner.len());
    for c in service.chars() {
        if c == '_' {
            s.push_str("_0");
        } else {
            s.push(c);
        }
    }
    s.push_str(SEP);
    s.push_str(inner);
    s
}

/// The service and inner name of an exposed name, if it is one.
pub fn decode(exposed: &str) -> Option<(String, &str)> {
    let at = exposed.find(SEP)?;
    let (escaped, rest) = exposed.split_at(at);
    let inner = &rest[SEP.len()..];
    let mut service = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c == '_' {
            if chars.next() != Some('0') {
                return None;
            }
            service.push('_');
        } else {
            service.push(c);
        }
    }
    validate_name("service name", &service).ok()?;
    Some((service, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_read_as_is() {
        assert_eq!(encode("time", "get_current_time"), "time__get_current_time");
        assert_eq!(
            decode("time__get_current_time"),
            Some(("time".into(), "get_current_time"))
        );
        assert_eq!(encode("fs", "file:///a__b"), "fs__file:///a__b");
        assert_eq!(
            decode("fs__file:///a__b"),
            Some(("fs".into(), "file:///a__b"))
        );
    }

    #[test]
    fn underscores_cannot_collide() {
        let cases = [
            ("a__b", "c"),
            ("a", "b__c"),
            ("a_", "_b"),
            ("a", "__b"),
            ("a_0b", "c"),
            ("a_b", "c"),
            ("a-b_", "x"),
            ("a", ""),
        ];
        let mut seen = std::collections::HashMap::new();
        for (svc, inner) in cases {
            let e = encode(svc, inner);
            assert!(
                e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)),
                "{e}"
            );
            assert_eq!(decode(&e), Some((svc.to_string(), inner)), "{e}");
            if let Some(prev) = seen.insert(e.clone(), (svc, inner)) {
                panic!("{e} from both {prev:?} and {:?}", (svc, inner));
            }
        }
    }

    #[test]
    fn foreign_names_are_refused() {
        for bad in ["plain", "__x", "a_b__c", "a_1__c", "-a__x", "a_"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
