//! `breakwater top`: polls an admin listener's `/debug/top` and shows it,
//! once as plain text (`--once`, for scripts) or as a terminal UI that
//! refreshes every second until `q`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use super::render::{self, SortBy, Ui};
use super::view::TopView;
use crate::error::Chain;

/// The largest `/debug/top` document read (a full table is ~200 KiB).
const MAX_BODY: usize = 8 << 20;
/// How long one fetch may take before the UI says so.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why `breakwater top` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("{0}: only plain http:// URLs (the admin listener) can be read")]
    NotHttp(String),
    #[error("{0}: not a URL")]
    BadUrl(String),
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: crate::upstream::BoxError,
    },
    #[error("{0} answered {1}")]
    Status(String, http::StatusCode),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{url} did not answer a /debug/top document")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the terminal")]
    Terminal(#[from] std::io::Error),
}

/// `http://host:port` (or with a trailing `/` or `/debug/top`) → the
/// document's URL.
pub fn top_url(admin: &str) -> Result<http::Uri, TopError> {
    let base = admin.trim_end_matches('/');
    let base = base.strip_suffix("/debug/top").unwrap_or(base);
    let url = format!("{base}/debug/top");
    let uri: http::Uri = url.parse().map_err(|_| TopError::BadUrl(admin.into()))?;
    if uri.scheme_str() != Some("http") {
        return Err(TopError::NotHttp(admin.into()));
    }
    Ok(uri)
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Fetches one view.
pub async fn fetch(client: &Client, uri: &http::Uri) -> Result<TopView, TopError> {
    let url = uri.to_string();
    let get = async {
        let resp = client
            .get(uri.clone())
            .await
            .map_err(|e| TopError::Request {
                url: url.clone(),
                source: e.into(),
            })?;
        if resp.status() != http::StatusCode::OK {
            return Err(TopError::Status(url.clone(), resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| TopError::Request {
                url: url.clone(),
                source: e,
            })?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|source| TopError::Decode {
            url: url.clone(),
            source,
        })
    };
    tokio::time::timeout(FETCH_TIMEOUT, get)
        .await
        .map_err(|_| TopError::Timeout(url.clone(), FETCH_TIMEOUT))?
}

/// `breakwater top --once`: one plain-text snapshot.
pub async fn once(admin: &str, sort: SortBy, limit: usize) -> Result<String, TopError> {
    let uri = top_url(admin)?;
    let view = fetch(&client(), &uri).await?;
    Ok(render::plain(&view, sort, limit))
}

/// `breakwater top`: the terminal UI until `q`, Esc or Ctrl-C.
pub async fn interactive(admin: &str, sort: SortBy) -> Result<(), TopError> {
    let uri = top_url(admin)?;
    let client = client();
    // Fail before taking over the terminal if nothing answers at all.
    let mut view = Some(fetch(&client, &uri).await?);
    let mut terminal = ratatui::try_init()?;
    let res = run(&mut terminal, &client, &uri, &mut view, admin, sort).await;
    ratatui::restore();
    res
}

async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    client: &Client,
    uri: &http::Uri,
    view: &mut Option<TopView>,
    admin: &str,
    sort: SortBy,
) -> Result<(), TopError> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let mut ui = Ui {
        admin: admin.to_string(),
        sort,
        error: None,
    };
    let mut next_fetch = Instant::now() + Duration::from_secs(1);
    loop {
        if Instant::now() >= next_fetch {
            match fetch(client, uri).await {
                Ok(v) => {
                    *view = Some(v);
                    ui.error = None;
                }
                // The last good view stays on screen, with the reason.
                Err(err) => ui.error = Some(Chain(&err).to_string()),
            }
            next_fetch = Instant::now() + Duration::from_secs(1);
        }
        terminal.draw(|f| render::draw(f, view.as_ref(), &ui))?;
        // Key presses wait on a blocking thread, up to the next refresh.
        let wait = next_fetch.saturating_duration_since(Instant::now());
        let ev = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Event>> {
            if event::poll(wait)? {
                Ok(Some(event::read()?))
            } else {
                Ok(None)
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        let Some(Event::Key(key)) = ev else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Tab => ui.sort = ui.sort.next(),
            KeyCode::Char(c) => {
                if let Some(s) = SortBy::from_key(c) {
                    ui.sort = s;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_may_name_the_document_or_not() {
        for admin in [
            "http://127.0.0.1:9444",
            "http://127.0.0.1:9444/",
            "http://127.0.0.1:9444/debug/top",
        ] {
            assert_eq!(
                top_url(admin).expect("url").to_string(),
                "http://127.0.0.1:9444/debug/top"
            );
        }
        assert!(matches!(
            top_url("https://127.0.0.1:6443"),
            Err(TopError::NotHttp(_))
        ));
    }
}
