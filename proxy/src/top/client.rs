//! `breakwater top`: polls an admin listener's `/debug/top` and shows it,
//! once as plain text (`--once`, for scripts) or as a terminal UI that
//! refreshes every second until `q`.

use std::time::{Duration, Instant};

use super::render::{self, SortBy, Ui};
use super::view::TopView;
use crate::admin_client::{AdminClient, AdminError};
use crate::error::Chain;

/// How long one fetch may take before the UI says so.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Where the document is.
const TOP_PATH: &str = "/debug/top";

/// Why `breakwater top` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("the terminal")]
    Terminal(#[from] std::io::Error),
}

/// A client of the admin listener at `admin`: `http://host:port`, or with
/// a trailing `/` or `/debug/top`.
pub fn top_client(admin: &str) -> Result<AdminClient, TopError> {
    let base = admin.trim_end_matches('/');
    let base = base.strip_suffix(TOP_PATH).unwrap_or(base);
    Ok(AdminClient::new(base, FETCH_TIMEOUT)?)
}

/// Fetches one view.
pub async fn fetch(client: &AdminClient) -> Result<TopView, TopError> {
    Ok(client.get(TOP_PATH).await?)
}

/// `breakwater top --once`: one plain-text snapshot.
pub async fn once(admin: &str, sort: SortBy, limit: usize) -> Result<String, TopError> {
    let view = fetch(&top_client(admin)?).await?;
    Ok(render::plain(&view, sort, limit))
}

/// `breakwater top`: the terminal UI until `q`, Esc or Ctrl-C.
pub async fn interactive(admin: &str, sort: SortBy) -> Result<(), TopError> {
    let client = top_client(admin)?;
    // Fail before taking over the terminal if nothing answers at all.
    let mut view = Some(fetch(&client).await?);
    let mut terminal = ratatui::try_init()?;
    let res = run(&mut terminal, &client, &mut view, admin, sort).await;
    ratatui::restore();
    res
}

async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    client: &AdminClient,
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
            match fetch(client).await {
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
                top_client(admin).expect("client").url(TOP_PATH),
                "http://127.0.0.1:9444/debug/top"
            );
        }
        assert!(matches!(
            top_client("https://127.0.0.1:6443"),
            Err(TopError::Admin(AdminError::NotHttp(_)))
        ));
    }
}
