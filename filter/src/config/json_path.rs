//! Names the field at a position of a JSON text, for error messages.

/// The path (`keys[0].secret`) of the value at a line and column of a JSON
/// text, for error messages: serde_json reports where it stopped, and this
/// names the field there. (A path-tracking deserializer would do the same at
/// a fifth of the .wasm's size.) Lenient: any text gives some path.
pub fn json_path_at(json: &[u8], line: usize, column: usize) -> String {
    enum Frame {
        Object { key: Option<String>, expect_key: bool },
        Array { index: usize },
    }
    let offset = json
        .split_inclusive(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(<[u8]>::len)
        .sum::<usize>()
        .saturating_add(column);
    let text = json.get(..offset.min(json.len())).unwrap_or(json);
    let mut stack: Vec<Frame> = Vec::new();
    let mut bytes = text.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'{' => stack.push(Frame::Object { key: None, expect_key: true }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, expect_key }) => {
                    *key = None;
                    *expect_key = true;
                }
                None => {}
            },
            b'"' => {
                let mut string = Vec::new();
                while let Some(c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        c => string.push(c),
                    }
                }
                if let Some(Frame::Object { key, expect_key: expect @ true }) = stack.last_mut() {
                    *key = Some(String::from_utf8_lossy(&string).into_owned());
                    *expect = false;
                }
            }
            _ => {}
        }
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
            Frame::Object { key: None, .. } => {}
        }
    }
    path
}

/// serde_json appends " at line 1 column 42"; the field path says more.
pub fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_name_the_value_at_a_position() {
        let json = br#"{"a":{"b":[1,{"c":"x,}]"}],"d":2}}"#;
        let at = |needle: &str| {
            let end = json.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() + needle.len();
            json_path_at(json, 1, end)
        };
        assert_eq!(at(r#""c":"x,}]""#), "a.b[1].c");
        assert_eq!(at(r#"[1"#), "a.b[0]");
        assert_eq!(at(r#"}],"d""#), "a.d");
        assert_eq!(json_path_at(b"{\n\"a\":\n  {\"b\":1", 3, 7), "a.b");
        assert_eq!(json_path_at(b"", 9, 9), "");
    }
}
