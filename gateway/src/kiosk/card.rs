//! Cards: a clinic card's UID never leaves memory. The gateway keeps only
//! `HMAC-SHA256(card_key, UID)` (lower-case hex), the CRM's configuration maps those hashes to
//! pseudonymous patient ids (`cards` in `phg.config/2`), and `gateway kiosk card-hash` computes the hash
//! a clinic registers for a card. The key is per deployment, so a hash from one clinic names nothing in
//! another, and a leaked configuration cannot be matched against UIDs read elsewhere without the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shortest card key accepted, bytes (HMAC-SHA256's own output size: shorter keys weaken it).
pub const MIN_KEY_BYTES: usize = 32;

/// A per-deployment card key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct CardKey(Vec<u8>);

impl std::fmt::Debug for CardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardKey(..)")
    }
}

/// Why a key or a UID is refused (never quoting it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// The key is not hex, or too short.
    #[error("the card key must be at least {MIN_KEY_BYTES} bytes, written as hex ({} hex digits)", MIN_KEY_BYTES * 2)]
    Key,
    /// The UID is not 4, 7 or 10 bytes of hex.
    #[error("a card UID is 4, 7 or 10 bytes, written as hex")]
    Uid,
}

impl CardKey {
    /// A key written as hex (the first line of a key file, or `[kiosk] card_key`).
    ///
    /// # Errors
    /// [`CardError::Key`].
    pub fn from_hex(text: &str) -> Result<CardKey, CardError> {
        let bytes = from_hex(text.trim()).ok_or(CardError::Key)?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(CardError::Key);
        }
        Ok(CardKey(bytes))
    }

    /// The hash of a card UID, lower-case hex (64 digits).
    pub fn hash(&self, uid: &[u8]) -> String {
        // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(uid);
        protocol::wire::to_hex(&mac.finalize().into_bytes())
    }
}

/// A UID written as hex (`04A1B2C3`, `04:a1:b2:c3` also taken), checked for a card's length.
///
/// # Errors
/// [`CardError::Uid`].
pub fn uid_from_hex(text: &str) -> Result<Vec<u8>, CardError> {
    let clean: String = text.chars().filter(|c| *c != ':' && *c != ' ').collect();
    let bytes = from_hex(&clean).ok_or(CardError::Uid)?;
    if ![4, 7, 10].contains(&bytes.len()) {
        return Err(CardError::Uid);
    }
    Ok(bytes)
}

/// Whether `s` is a card hash as the CRM sends it: 64 lower-case hex digits.
pub fn is_card_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2 uses a 4-byte key ("Jefe"), below our minimum; test case 6's key is 131
        // bytes of 0xaa with the message "Test Using Larger Than Block-Size Key - Hash Key First".
        let key = CardKey::from_hex(&"aa".repeat(131)).expect("a long key");
        assert_eq!(
            key.hash(b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn short_keys_and_odd_uids_are_refused() {
        assert_eq!(CardKey::from_hex("00112233"), Err(CardError::Key));
        assert_eq!(CardKey::from_hex(&"zz".repeat(32)), Err(CardError::Key));
        assert!(CardKey::from_hex(&"0f".repeat(32)).is_ok());
        assert_eq!(uid_from_hex("04a1b2"), Err(CardError::Uid));
        assert_eq!(
            uid_from_hex("04:A1:B2:C3").expect("4 bytes"),
            vec![4, 0xa1, 0xb2, 0xc3]
        );
    }

    #[test]
    fn a_hash_depends_on_the_key_and_looks_like_what_the_crm_sends() {
        let a = CardKey::from_hex(&"01".repeat(32)).expect("key");
        let b = CardKey::from_hex(&"02".repeat(32)).expect("key");
        let uid = [4, 1, 2, 3];
        assert_ne!(a.hash(&uid), b.hash(&uid));
        assert!(is_card_hash(&a.hash(&uid)));
        assert!(!is_card_hash("04010203"));
    }
}
