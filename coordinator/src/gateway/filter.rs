//! Content filters of a tenant: regular expressions that block or mask.
//!
//! A prompt that matches a `block` filter is refused 400
//! `content_filtered` (nothing is sent to a replica); an answer that
//! matches one is withheld: its content is emptied and its
//! `finish_reason` is `content_filter`, as OpenAI's own filter reports it;
//! a stream that comes to match one ends there with such a chunk. What a
//! `mask` filter matches is replaced by `[FILTERED]`, in prompts and in
//! answers, streamed ones included (with PII masking's hold-back, so a
//! match up to [`super::mask::HOLD`] bytes long is found across chunks).
//! Patterns are compiled once per tenant revision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use regex::Regex;

use crate::state::{FilterAction, Tenant};

/// A tenant's filters, compiled.
#[derive(Debug, Default)]
pub struct Filters {
    block: Vec<(usize, Regex)>,
    mask: Vec<Regex>,
}

impl Filters {
    pub fn compile(tenant: &Tenant) -> Result<Filters, String> {
        let mut f = Filters::default();
        for (i, filter) in tenant.filters.iter().enumerate() {
            let re = filter.compile()?;
            match filter.action {
                FilterAction::Block => f.block.push((i, re)),
                FilterAction::Mask => f.mask.push(re),
            }
        }
        Ok(f)
    }

    pub fn is_empty(&self) -> bool {
        self.block.is_empty() && self.mask.is_empty()
    }

    /// The number of the first block filter `text` matches.
    pub fn blocked(&self, text: &str) -> Option<usize> {
        self.block
            .iter()
            .find(|(_, re)| re.is_match(text))
            .map(|(i, _)| *i)
    }

    /// Byte ranges the mask filters match.
    pub fn masked(&self, text: &str) -> Vec<(usize, usize)> {
        self.mask
            .iter()
            .flat_map(|re| re.find_iter(text).map(|m| (m.start(), m.end())))
            .filter(|(s, e)| e > s)
            .collect()
    }
}

/// Compiled filters by tenant, kept while the tenant's revision holds.
#[derive(Default)]
pub struct FilterCache {
    by_tenant: Mutex<HashMap<String, (u64, Arc<Filters>)>>,
}

impl FilterCache {
    /// The tenant's filters (`None` when it has none). A pattern that no
    /// longer compiles (it was checked when set) blocks everything: fail
    /// closed.
    pub fn of(&self, tenant: &Tenant) -> Option<Arc<Filters>> {
        if tenant.filters.is_empty() {
            return None;
        }
        let mut all = self.by_tenant.lock().expect("filter lock poisoned");
        if let Some((revision, f)) = all.get(&tenant.name) {
            if *revision == tenant.revision {
                return Some(f.clone());
            }
        }
        let f = Arc::new(Filters::compile(tenant).unwrap_or_else(|e| {
            tracing::error!(tenant = %tenant.name, error = %e, "content filters do not compile: blocking everything");
            Filters {
                block: vec![(0, Regex::new("(?s).*").expect("a valid pattern"))],
                mask: vec![],
            }
        }));
        all.insert(tenant.name.clone(), (tenant.revision, f.clone()));
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ContentFilter;

    #[test]
    fn block_and_mask() {
        let tenant = Tenant {
            name: "t".into(),
            models: vec![],
            limits: Default::default(),
            created_at_ms: 0,
            revision: 1,
            mask_pii: false,
            cache_ttl_s: 0,
            filters: vec![
                ContentFilter {
                    pattern: r"(?i)\bproject\s+zeus\b".into(),
                    action: FilterAction::Block,
                },
                ContentFilter {
                    pattern: r"(?i)\bdarn\b".into(),
                    action: FilterAction::Mask,
                },
            ],
        };
        let f = Filters::compile(&tenant).unwrap();
        assert_eq!(f.blocked("tell me about Project  Zeus"), Some(0));
        assert_eq!(f.blocked("zeus alone is fine"), None);
        assert_eq!(f.masked("darn it, DARN"), vec![(0, 4), (9, 13)]);
        let bad = ContentFilter {
            pattern: "(unclosed".into(),
            action: FilterAction::Block,
        };
        assert!(bad
            .compile()
            .unwrap_err()
            .contains("not a valid regular expression"));
        let cache = FilterCache::default();
        let a = cache.of(&tenant).unwrap();
        assert!(
            Arc::ptr_eq(&a, &cache.of(&tenant).unwrap()),
            "compiled once"
        );
    }
}
