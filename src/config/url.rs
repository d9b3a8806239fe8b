//! Upstream addresses: `host:port`, or `redis://[user[:password]@]host[:port][/db]` and
//! `rediss://...` (TLS).
//!
//! A URL's user and password are percent-decoded. Database numbers other than 0 are
//! refused: redfuse's connections all start in database 0 and clients `SELECT` their own,
//! which a default database on the URL would silently contradict.

/// What an upstream address says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAddr {
    /// `host:port`, as connected to (IPv6 literals keep their brackets).
    pub addr: String,
    /// The host alone: the TLS server name unless `tls_server_name` says otherwise.
    pub host: String,
    /// `rediss://`.
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The address with any password replaced, for messages.
pub fn redact(addr: &str) -> String {
    let Some((scheme, rest)) = addr.split_once("://") else {
        return addr.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let shown = if userinfo.contains(':') {
                format!("{user}:<redacted>")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{shown}@{hostport}{tail}")
        }
        None => addr.to_owned(),
    }
}

/// Parses an upstream address; the error message never contains the password.
pub fn parse(s: &str) -> Result<ParsedAddr, String> {
    let Some((scheme, rest)) = s.split_once("://") else {
        let host = s
            .rsplit_once(':')
            .map_or(s, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        return Ok(ParsedAddr {
            addr: s.to_owned(),
            host,
            tls: false,
            username: None,
            password: None,
        });
    };
    let shown = redact(s);
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "redis" => false,
        "rediss" => true,
        other => {
            return Err(format!(
                "`{shown}`: `{other}://` is not supported; use redis:// or rediss:// (TLS)"
            ));
        }
    };
    if rest.contains(['?', '#']) {
        return Err(format!(
            "`{shown}`: URL query parameters and fragments are not supported"
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((user, pass)) => (user, Some(pass)),
                None => (u, None),
            };
            let user = decode(user).map_err(|e| format!("`{shown}`: user: {e}"))?;
            let pass = pass
                .map(decode)
                .transpose()
                .map_err(|e| format!("`{shown}`: password: {e}"))?;
            ((!user.is_empty()).then_some(user), pass)
        }
    };
    if username.is_some() && password.is_none() {
        return Err(format!(
            "`{shown}`: a user in the URL needs a password too (redis://user:password@host)"
        ));
    }
    let (host, port) = split_host_port(hostport)
        .ok_or_else(|| format!("`{shown}`: `{hostport}` is not host[:port]"))?;
    let db = path.trim_start_matches('/');
    if !db.is_empty() {
        match db.parse::<u32>() {
            Ok(0) => {}
            Ok(n) => {
                return Err(format!(
                    "`{shown}`: database {n} is not supported: redfuse's connections use \
                     database 0 and clients SELECT their own; drop `/{n}` from the URL"
                ));
            }
            Err(_) => {
                return Err(format!(
                    "`{shown}`: `/{db}` is not a database number (only `/0` is accepted)"
                ));
            }
        }
    }
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(ParsedAddr {
        addr,
        host: host.to_owned(),
        tls,
        username,
        password,
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; the port defaults to 6379.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => 6379,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        return (!host.is_empty()).then_some((host, port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (s, 6379),
    };
    (!host.is_empty() && !host.contains(':')).then_some((host, port))
}

/// Percent-decoding of a URL's user or password.
pub(crate) fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a `%` not followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once percent-decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses_pass_through() {
        let p = parse("redis.internal:6379").unwrap();
        assert_eq!(p.addr, "redis.internal:6379");
        assert_eq!(p.host, "redis.internal");
        assert!(!p.tls);
        assert_eq!(p.password, None);
    }

    #[test]
    fn urls_with_credentials_db_and_tls() {
        let p = parse("redis://app:p%40ss%3Aw%2Cord@cache:6380/0").unwrap();
        assert_eq!(p.addr, "cache:6380");
        assert_eq!(p.username.as_deref(), Some("app"));
        assert_eq!(p.password.as_deref(), Some("p@ss:w,ord"));
        assert!(!p.tls);
        let p = parse("rediss://:secret@[::1]").unwrap();
        assert_eq!(p.addr, "[::1]:6379");
        assert_eq!(p.host, "::1");
        assert_eq!(p.username, None);
        assert_eq!(p.password.as_deref(), Some("secret"));
        assert!(p.tls);
        let p = parse("REDISS://host/").unwrap();
        assert!(p.tls);
        assert_eq!(p.addr, "host:6379");
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for (url, says) in [
            ("redis://u:topsecret@h:1/3", "database 3"),
            ("redis://u:topsecret@h:1/x", "not a database"),
            ("http://u:topsecret@h:1", "not supported"),
            ("redis://u:topsecret@h:1?db=1", "query"),
            ("redis://u:top%zzsecret@h:1", "password"),
            ("redis://u@h:1", "needs a password"),
            ("redis://u:topsecret@h:port", "not host[:port]"),
            ("redis://u:topsecret@:1", "not host[:port]"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("topsecret"), "{url} leaks its password: {e}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://u:<redacted>@h:1/0");
        assert_eq!(redact("redis://:pw@h"), "redis://:<redacted>@h");
        assert_eq!(redact("h:1"), "h:1");
    }
}
