//! One access-log line per request: plain text by default, JSON lines when configured.
//!
//! Lines go through the `log` crate under [`TARGET`], so `RUST_LOG` filters apply
//! (`RUST_LOG=info,taskcluster_proxy::access=off` silences them); the logger prints them
//! without its usual prefix so JSON lines stay machine-readable. Paths have bewits redacted.

use serde::{Deserialize, Serialize};

/// Log target of access lines.
pub const TARGET: &str = "taskcluster_proxy::access";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
    Off,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "off" => Ok(Format::Off),
            _ => Err(format!("access log format {s:?} is not text, json or off")),
        }
    }
}

/// What is logged about one request. Never holds a secret: `path` is already redacted.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub method: &'a str,
    pub form: &'a str,
    pub service: &'a str,
    pub upstream: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub upstream_reused: Option<bool>,
    pub retries: u32,
    pub client: &'a str,
    /// Shared mode: the task the request was attributed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<&'a str>,
}

impl Record<'_> {
    pub fn line(&self, format: Format) -> Option<String> {
        match format {
            Format::Off => None,
            Format::Json => serde_json::to_string(self).ok(),
            Format::Text => Some(format!(
                "access {} \"{} {}\" {} form={} service={} upstream={} in={} out={} ms={:.3} reused={} retries={}{}",
                self.client,
                self.method,
                self.path,
                self.status,
                self.form,
                self.service,
                if self.upstream.is_empty() { "-" } else { self.upstream },
                self.bytes_in,
                self.bytes_out,
                self.duration_ms,
                self.upstream_reused.map_or("-".to_string(), |r| r.to_string()),
                self.retries,
                self.task.map_or(String::new(), |t| format!(" task={t}")),
            )),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    rfc3339(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_438_964_811_744), "2015-08-07T16:26:51.744Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines() {
        let r = Record {
            time: rfc3339(0),
            method: "GET",
            form: "api",
            service: "queue",
            upstream: "tc.example.com:443",
            path: "/api/queue/v1/x?bewit=REDACTED",
            status: 200,
            bytes_in: 0,
            bytes_out: 5,
            duration_ms: 1.5,
            upstream_reused: Some(true),
            retries: 0,
            client: "127.0.0.1:5000",
            task: None,
        };
        let json: serde_json::Value = serde_json::from_str(&r.line(Format::Json).unwrap()).unwrap();
        assert_eq!(json["status"], 200);
        assert_eq!(json["upstream_reused"], true);
        let text = r.line(Format::Text).unwrap();
        assert!(
            text.starts_with("access 127.0.0.1:5000 \"GET /api/queue/v1/x?bewit=REDACTED\" 200")
        );
        assert_eq!(r.line(Format::Off), None);
    }
}
