//! A header map as the proxy hands it over: one buffer, read in place.
//!
//! proxy-wasm serialises a map as `count`, then `count` pairs of (name
//! length, value length), then every name and value each followed by a NUL,
//! all lengths little-endian u32. Reading it in place costs one allocation
//! per map instead of two per header, which is most of what the pinned path
//! would otherwise spend.

/// A serialised header map.
#[derive(Debug, Default, Clone)]
pub struct HeaderMap {
    bytes: Vec<u8>,
}

impl HeaderMap {
    pub fn from_serialized(bytes: Vec<u8>) -> HeaderMap {
        HeaderMap { bytes }
    }

    /// Serialises pairs the way the proxy does (for fakes and tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderMap {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let length = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&length(pairs.len()));
        for (name, value) in &pairs {
            bytes.extend_from_slice(&length(name.len()));
            bytes.extend_from_slice(&length(value.len()));
        }
        for (name, value) in &pairs {
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(value);
            bytes.push(0);
        }
        HeaderMap { bytes }
    }

    /// The (name, value) pairs in order. A malformed buffer ends the iteration
    /// early rather than failing.
    pub fn iter(&self) -> Pairs<'_> {
        let count = read_u32(&self.bytes, 0).unwrap_or(0);
        // Each pair needs at least 8 bytes of lengths: bounds a lying count.
        let count = count.min(self.bytes.len() / 8);
        Pairs { bytes: &self.bytes, index: 0, count, data: 4 + count * 8 }
    }
}

pub struct Pairs<'a> {
    bytes: &'a [u8],
    index: usize,
    count: usize,
    /// Where the next name starts.
    data: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let sizes = 4 + self.index * 8;
        let name_len = read_u32(self.bytes, sizes)?;
        let value_len = read_u32(self.bytes, sizes + 4)?;
        let name = self.bytes.get(self.data..self.data.checked_add(name_len)?)?;
        let value_at = self.data + name_len + 1;
        let value = self.bytes.get(value_at..value_at.checked_add(value_len)?)?;
        self.data = value_at + value_len + 1;
        self.index += 1;
        Some((name, value))
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_read_back_as_serialised() {
        let pairs: [(&str, &[u8]); 3] = [(":path", b"/a"), ("cookie", b"sa=1; b=2"), ("empty", b"")];
        let map = HeaderMap::from_pairs(pairs);
        let read: Vec<_> = map.iter().collect();
        let expected: Vec<_> = pairs.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        assert_eq!(read, expected);
    }

    #[test]
    fn malformed_buffers_end_early_without_panicking() {
        let whole = HeaderMap::from_pairs([("name", &b"value"[..])]).bytes;
        for cut in 0..whole.len() {
            let map = HeaderMap::from_serialized(whole[..cut].to_vec());
            assert!(map.iter().count() <= 1);
        }
        let lying = HeaderMap::from_serialized(vec![0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
        assert_eq!(lying.iter().count(), 0);
        assert_eq!(HeaderMap::default().iter().count(), 0);
    }
}
