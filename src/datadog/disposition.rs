//! What an intake answer means for the batch that was sent. Pure: the whole policy is this one function.

use std::time::Duration;

use crate::http::ServerWait;

/// The longest the agent waits because the intake said so (`Retry-After`): the Datadog backoff cap.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(120);

/// What came back from one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status. A 2xx here is Datadog's answer only when it is 202 (the sink checks the body too and
    /// reports any other 2xx as `NotDatadog`).
    Status { code: u16, retry_after: Option<Duration> },
    /// A 2xx that is not Datadog's answer (not 202, or a body that is not a JSON object): a captive portal or a
    /// TLS-inspecting proxy answered, and nothing says Datadog has the batch.
    NotDatadog { code: u16 },
    /// No HTTP answer: refused or dropped connection, timeout, truncated response.
    NoAnswer,
}

/// Why the intake refused a batch as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the intake read the logs and something in them is malformed.
    Malformed,
    /// 413: the request is too large for the intake or for a proxy in front of it (nginx's
    /// `client_max_body_size`). It says nothing about the logs: smaller pieces may pass.
    TooLarge,
}

/// What to do with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Accepted: delete the batch in one transaction.
    Delete,
    /// Resend the two halves separately (413 until the pieces are small enough, or 400 to isolate the bad log).
    Split(Refusal),
    /// A single log Datadog refuses as is: keep it in the dead-letter table once the bisection proves it bad,
    /// never loop on it.
    DeadLetter(Refusal),
    /// The key is refused (401/403) or the URL is wrong: keep everything, say so loudly, retry slowly.
    Hold,
    /// Transient: retry with backoff, not sooner than `Retry-After` if given.
    Retry(Option<Duration>),
}

/// The whole policy. A batch is deleted only on a 202: every other 2xx is someone else's answer and is retried.
pub fn disposition(answer: Answer, batch_len: usize) -> Disposition {
    let code = match answer {
        Answer::NoAnswer | Answer::NotDatadog { .. } => return Disposition::Retry(None),
        Answer::Status { code, retry_after } => match code {
            408 | 429 | 500..=599 => return Disposition::Retry(retry_after),
            _ => code,
        },
    };
    match code {
        202 => Disposition::Delete,
        200..=299 => Disposition::Retry(None),
        400 if batch_len > 1 => Disposition::Split(Refusal::Malformed),
        400 => Disposition::DeadLetter(Refusal::Malformed),
        413 if batch_len > 1 => Disposition::Split(Refusal::TooLarge),
        413 => Disposition::DeadLetter(Refusal::TooLarge),
        // 401/403, and anything else (a redirect, 404) that says the key or the URL needs an operator.
        _ => Disposition::Hold,
    }
}

/// `Retry-After` in seconds, at most [`MAX_SERVER_WAIT`] (the HTTP-date form is rare at intakes and is treated as
/// absent).
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    retry_after_asked(value).map(|w| w.wait)
}

/// [`retry_after`] with what the server asked for, so a capped wait can be reported as such. Digits beyond u64
/// and exponents (`1e300`) count as huge, not as absent.
pub fn retry_after_asked(value: Option<&str>) -> Option<ServerWait> {
    crate::http::server_number(value?).map(|secs| ServerWait::capped(secs, MAX_SERVER_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::*;

    fn status(code: u16) -> Answer {
        Answer::Status { code, retry_after: None }
    }

    #[test]
    fn every_status_has_a_disposition() {
        let check = |a: Answer, n: usize, want: Disposition| assert_eq!(disposition(a, n), want, "{a:?} x{n}");
        check(status(202), 10, Delete);
        // Only 202 is Datadog's "accepted"; another 2xx, or a 202 whose body is not Datadog's, keeps the batch.
        check(status(200), 1, Retry(None));
        check(status(204), 10, Retry(None));
        check(Answer::NotDatadog { code: 202 }, 10, Retry(None));
        check(Answer::NotDatadog { code: 200 }, 1, Retry(None));
        check(status(400), 10, Split(Refusal::Malformed));
        check(status(400), 1, DeadLetter(Refusal::Malformed));
        check(status(413), 2, Split(Refusal::TooLarge));
        check(status(413), 1, DeadLetter(Refusal::TooLarge));
        check(status(401), 10, Hold);
        check(status(403), 10, Hold);
        check(status(404), 10, Hold);
        check(status(301), 10, Hold);
        check(status(408), 10, Retry(None));
        check(status(500), 10, Retry(None));
        check(status(503), 10, Retry(None));
        check(
            Answer::Status { code: 429, retry_after: Some(Duration::from_secs(7)) },
            10,
            Retry(Some(Duration::from_secs(7))),
        );
        check(Answer::NoAnswer, 10, Retry(None));
        assert_eq!(retry_after(Some(" 12 ")), Some(Duration::from_secs(12)));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        for huge in ["18446744073709551615", "99999999999999999999999", "1e300", "1e400", "121"] {
            assert_eq!(retry_after(Some(huge)), Some(MAX_SERVER_WAIT), "{huge}");
        }
        for bad in ["-1", "inf", "NaN", ""] {
            assert_eq!(retry_after(Some(bad)), None, "{bad}");
        }
        let w = retry_after_asked(Some("18446744073709551615")).expect("a number");
        assert_eq!(w.to_string(), "server asked 1.8e19 s; waiting the 120 s cap");
    }
}
