//! Identity: the rules for names and passwords, bearer tokens, and the
//! token secret.
//!
//! Tokens are JWTs signed with HS256 (`sub` = username, `iat`, `exp`), so any
//! standard JWT library can read them. The secret comes from `TOKEN_SECRET`, or
//! is generated once into `DATA_DIR/token_secret` (mode 0600) and reused.

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The name given to a WebSocket that sends no username in open mode.
pub const ANONYMOUS: &str = "Anonymous";

/// Longest password bcrypt reads, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 72;

/// The highest bcrypt cost a login verifies when `BCRYPT_COST` is lower.
/// Each step doubles the work: cost 16 is 64 times the default 10, while a
/// stored hash of cost 31 (corrupt, or planted in a taken-over database)
/// would keep a hash thread busy for days.
pub const MAX_VERIFY_COST: u32 = 16;

/// The cost a bcrypt hash (`$2b$10$...`) was made with.
pub fn hash_cost(hash: &str) -> Option<u32> {
    let mut parts = hash.split('$');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(""), Some(_version), Some(cost)) if cost.len() == 2 => cost.parse().ok(),
        _ => None,
    }
}
pub const MIN_PASSWORD_BYTES: usize = 8;

/// Why a username is refused, or `None` when it is fine.
pub fn username_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.chars().count() > 32 {
        return Some("username must be 1 to 32 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Some("username may contain only letters, digits, '_', '-' and '.'");
    }
    None
}

/// `Anonymous` (in any case) cannot be registered.
pub fn is_reserved(name: &str) -> bool {
    name.eq_ignore_ascii_case(ANONYMOUS)
}

pub fn password_problem(password: &str) -> Option<&'static str> {
    let n = password.len();
    if n < MIN_PASSWORD_BYTES {
        return Some("password must be at least 8 bytes");
    }
    if n > MAX_PASSWORD_BYTES {
        return Some("password must be at most 72 bytes");
    }
    None
}

/// Why a room name is refused, or `None` when it is fine.
pub fn room_name_problem(name: &str) -> Option<&'static str> {
    let chars = name.chars().count();
    if chars == 0 || name.trim().is_empty() {
        return Some("room name must not be blank");
    }
    if chars > 64 {
        return Some("room name must be at most 64 characters");
    }
    if name.contains('/') {
        return Some("room name must not contain '/'");
    }
    if name.chars().any(char::is_control) {
        return Some("room name must not contain control characters");
    }
    None
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// Signs and checks tokens. Cheap to clone into worker jobs.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Tokens {
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    /// A fresh token for `username`.
    pub fn issue(&self, username: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: username.to_owned(),
            iat: now,
            exp: now.saturating_add(self.ttl.as_secs()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| e.to_string())
    }

    /// The username a valid, unexpired token names.
    pub fn verify(&self, token: &str) -> Option<String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        username_problem(&data.claims.sub)
            .is_none()
            .then_some(data.claims.sub)
    }
}

/// The configured secret, or the one kept in `data_dir` (created on first use).
pub fn load_secret(configured: Option<&str>, data_dir: &Path) -> Result<Vec<u8>, String> {
    if let Some(s) = configured {
        if s.len() < 16 {
            return Err("TOKEN_SECRET must be at least 16 bytes".into());
        }
        return Ok(s.as_bytes().to_vec());
    }
    let path = data_dir.join("token_secret");
    if let Some(secret) = read_secret(&path)? {
        return Ok(secret);
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness for the token secret: {e}"))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    // Written whole to a private file first, then linked into place: the
    // link either appears with the complete secret or fails because another
    // process sharing the directory got there first. No process can read a
    // half-written secret, and a failed write leaves nothing behind.
    let tmp = data_dir.join(format!(
        "token_secret.{}.{}.tmp",
        std::process::id(),
        &hex[..8]
    ));
    let linked = write_private(&tmp, hex.as_bytes()).and_then(|_| {
        match std::fs::hard_link(&tmp, &path) {
            // A file system without hard links (vfat, some network mounts):
            // create the file in place, as before, with the small race
            // between two processes starting at once that this avoids.
            Err(e) if cannot_link(&e) && !path.exists() => {
                log::warn!(
                    "cannot link {} into place ({e}); writing it directly",
                    path.display()
                );
                write_private(&path, hex.as_bytes())
            }
            other => other,
        }
    });
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            Ok(hex.into_bytes())
        }
        // Another process won the race: use its secret, which is complete.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_secret(&path)?.ok_or_else(|| format!("{} vanished while starting", path.display()))
        }
        Err(e) => Err(format!(
            "cannot create {}: {e} (or set TOKEN_SECRET)",
            path.display()
        )),
    }
}

/// The file system does not do hard links.
fn cannot_link(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// The secret kept at `path`, `None` if there is none yet.
fn read_secret(path: &Path) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => Ok(Some(s.trim().as_bytes().to_vec())),
        Ok(_) => Err(format!(
            "{} is too short; delete it to regenerate",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Create `path` readable by its owner only, write `data` and sync it.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// A hash to verify against when a user does not exist, so that an unknown
/// name takes as long to refuse as a wrong password.
pub fn dummy_hash(cost: u32) -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        bcrypt::hash("not a real password, never matches", cost).unwrap_or_else(|_| {
            "$2b$10$invalidinvalidinvalidinuinvalidinvalidinvalidinvalid".into()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_rules() {
        assert!(username_problem("user_1.2-x").is_none());
        assert!(username_problem("").is_some());
        assert!(username_problem(&"a".repeat(33)).is_some());
        assert!(username_problem("has space").is_some());
        assert!(username_problem("émile").is_some());
        assert!(is_reserved("anonymous"));
    }

    #[test]
    fn room_rules() {
        assert!(room_name_problem("General chat").is_none());
        assert!(room_name_problem("   ").is_some());
        assert!(room_name_problem("a/b").is_some());
        assert!(room_name_problem("bell\u{7}").is_some());
        assert!(room_name_problem(&"é".repeat(64)).is_none());
        assert!(room_name_problem(&"é".repeat(65)).is_some());
    }

    #[test]
    fn racing_starts_on_a_fresh_directory_share_one_complete_secret() {
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data");
            let got: Vec<Result<Vec<u8>, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| load_secret(None, &path)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let first = got[0]
                .clone()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(first.len(), 64, "round {round}");
            for g in &got {
                assert_eq!(g.as_ref(), Ok(&first), "round {round}");
            }
            let left: Vec<_> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["token_secret"], "round {round}");
            assert_eq!(load_secret(None, &path).unwrap(), first);
        }
    }

    #[test]
    fn hash_cost_is_read_from_the_hash() {
        let h = bcrypt::hash("pw", 4).unwrap();
        assert_eq!(hash_cost(&h), Some(4));
        assert_eq!(
            hash_cost("$2a$31$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234"),
            Some(31)
        );
        assert_eq!(hash_cost("plain text"), None);
        assert_eq!(hash_cost("$2b$x$"), None);
    }

    #[test]
    fn a_short_kept_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token_secret"), "").unwrap();
        let e = load_secret(None, dir.path()).unwrap_err();
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let t = Tokens::new(b"0123456789abcdef0123", Duration::from_secs(60));
        let tok = t.issue("alice").unwrap();
        assert_eq!(t.verify(&tok).as_deref(), Some("alice"));
        let other = Tokens::new(b"another secret entirely", Duration::from_secs(60));
        assert!(other.verify(&tok).is_none());
        let expired = Tokens::new(b"0123456789abcdef0123", Duration::from_secs(0));
        let old = expired.issue("alice").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(t.verify(&old).is_none());
    }
}
