//! The source-string parser: any string parses or is refused without a
//! panic, and what it accepts prints back to the same source.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbox::acquire::Source;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(source) = s.parse::<Source>() {
        let printed = source.to_string();
        let again: Source = printed.parse().expect("a printed source parses");
        assert_eq!(again, source);
        // Nothing accepted can start an option or escape with `..`.
        match &source {
            // No path component can climb out of the cache.
            Source::Npm { name, .. } => {
                assert!(!name.starts_with('-'));
                assert!(name.split('/').all(|c| c != ".." && c != "." && !c.is_empty()));
            }
            Source::Git { url, reference } => {
                assert!(!url.starts_with('-') && !url.contains("::"));
                assert!(reference.as_deref().is_none_or(|r| !r.starts_with('-') && !r.contains("..")));
            }
            Source::Path(p) => assert!(p.is_absolute()),
            _ => {}
        }
    }
});
