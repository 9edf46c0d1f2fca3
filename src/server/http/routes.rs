//! The HTTP front's route table, as a pure function: a method and a path in, a [`Route`] or a
//! 404/405 out. Every path and which of them need the API key are in one table ([`ROUTES`]),
//! which the tests walk.

use super::head::Method;
use super::HttpError;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: the chat page.
    Page,
    /// `GET /health`.
    Health,
    /// `GET /metrics` (Prometheus).
    Metrics,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model(String),
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
    /// `POST /tokenize` (llama-server's).
    Tokenize,
    /// `POST /detokenize` (llama-server's).
    Detokenize,
    /// `GET /props` (llama-server's).
    Props,
    /// `OPTIONS` on any known path: a CORS preflight.
    Preflight,
    /// `POST /api/chat` (Ollama's).
    OllamaChat,
    /// `POST /api/generate` (Ollama's).
    OllamaGenerate,
    /// `POST /api/show` (Ollama's).
    OllamaShow,
    /// `GET /api/tags` (Ollama's list of models).
    OllamaTags,
    /// `GET /api/ps` (Ollama's loaded models).
    OllamaPs,
    /// `GET /api/version` (Ollama's).
    OllamaVersion,
}

impl Route {
    /// Whether the request carries a body to read (a POST route).
    pub fn takes_body(&self) -> bool {
        matches!(
            self,
            Route::Chat
                | Route::Completion
                | Route::Tokenize
                | Route::Detokenize
                | Route::OllamaChat
                | Route::OllamaGenerate
                | Route::OllamaShow
        )
    }
}

/// Whether a path is under Ollama's API (`/api/`): its errors are Ollama's `{"error": "..."}`.
pub fn is_ollama(path: &str) -> bool {
    path.starts_with("/api/")
}

/// One row of the table: a path (a trailing `/` means "and anything under it"), the methods
/// it answers besides `OPTIONS` and `HEAD` (for `GET` paths), and whether the API key is
/// needed when one is set.
#[derive(Debug, Clone, Copy)]
pub struct RouteRow {
    /// The path, or a prefix ending in `/`.
    pub path: &'static str,
    /// `GET` or `POST`.
    pub method: Method,
    /// Whether a configured API key is required.
    pub needs_key: bool,
}

const fn row(path: &'static str, method: Method, needs_key: bool) -> RouteRow {
    RouteRow {
        path,
        method,
        needs_key,
    }
}

/// Every route. The page and `/health` are open (a supervisor and a browser's first visit
/// need them); everything else needs the key when one is set.
pub const ROUTES: &[RouteRow] = &[
    row("/", Method::Get, false),
    row("/health", Method::Get, false),
    row("/metrics", Method::Get, true),
    row("/props", Method::Get, true),
    row("/tokenize", Method::Post, true),
    row("/detokenize", Method::Post, true),
    row("/v1/models", Method::Get, true),
    row("/v1/models/", Method::Get, true),
    row("/v1/chat/completions", Method::Post, true),
    row("/v1/completions", Method::Post, true),
    row("/models", Method::Get, true),
    row("/models/", Method::Get, true),
    row("/chat/completions", Method::Post, true),
    row("/completions", Method::Post, true),
    // Ollama's API (the key rules are the same: a client that cannot send a key, such as Home
    // Assistant's integration, is served under allowed_hosts without one; docs/http.md).
    row("/api/chat", Method::Post, true),
    row("/api/generate", Method::Post, true),
    row("/api/show", Method::Post, true),
    row("/api/tags", Method::Get, true),
    row("/api/ps", Method::Get, true),
    row("/api/version", Method::Get, true),
];

/// The table row for a path.
pub fn find(path: &str) -> Option<&'static RouteRow> {
    ROUTES.iter().find(|r| {
        if r.path.len() > 1 && r.path.ends_with('/') {
            path.strip_prefix(r.path).is_some_and(|id| !id.is_empty())
        } else {
            r.path == path
        }
    })
}

/// Whether a path needs the key (unknown paths do: nothing about them is told without it).
pub fn needs_key(path: &str) -> bool {
    find(path).is_none_or(|r| r.needs_key)
}

/// Routes a request.
///
/// # Errors
/// 404 for an unknown path, 405 for a method the path does not answer.
pub fn route(method: Method, path: &str) -> Result<Route, HttpError> {
    let Some(row) = find(path) else {
        return Err(HttpError::new(
            404,
            "invalid_request_error",
            "not_found",
            format!("no such endpoint: {path}"),
        ));
    };
    let allowed = match method {
        Method::Options => return Ok(Route::Preflight),
        Method::Get | Method::Head => row.method == Method::Get,
        Method::Post => row.method == Method::Post,
        Method::Other => false,
    };
    if !allowed {
        return Err(HttpError::new(
            405,
            "invalid_request_error",
            "method_not_allowed",
            format!("{} is not allowed on {path}", method.as_str()),
        ));
    }
    let unversioned = path.strip_prefix("/v1").filter(|p| p.starts_with('/')).unwrap_or(path);
    Ok(match unversioned {
        "/" => Route::Page,
        "/health" => Route::Health,
        "/metrics" => Route::Metrics,
        "/props" => Route::Props,
        "/tokenize" => Route::Tokenize,
        "/detokenize" => Route::Detokenize,
        "/models" => Route::Models,
        "/chat/completions" => Route::Chat,
        "/completions" => Route::Completion,
        "/api/chat" => Route::OllamaChat,
        "/api/generate" => Route::OllamaGenerate,
        "/api/show" => Route::OllamaShow,
        "/api/tags" => Route::OllamaTags,
        "/api/ps" => Route::OllamaPs,
        "/api/version" => Route::OllamaVersion,
        other => match other.strip_prefix("/models/") {
            Some(id) => Route::Model(id.to_string()),
            None => {
                return Err(HttpError::new(
                    404,
                    "invalid_request_error",
                    "not_found",
                    format!("no such endpoint: {path}"),
                ))
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_routes_and_the_aliases_agree() {
        for r in ROUTES {
            let path = if r.path.len() > 1 && r.path.ends_with('/') {
                format!("{}some-model", r.path)
            } else {
                r.path.to_string()
            };
            assert!(route(r.method, &path).is_ok(), "{path}");
            assert_eq!(route(Method::Options, &path).unwrap(), Route::Preflight);
            let wrong = if r.method == Method::Get {
                Method::Post
            } else {
                Method::Get
            };
            assert_eq!(route(wrong, &path).unwrap_err().status, 405, "{path}");
            assert_eq!(route(Method::Other, &path).unwrap_err().status, 405, "{path}");
        }
        assert_eq!(route(Method::Post, "/chat/completions").unwrap(), Route::Chat);
        assert_eq!(route(Method::Post, "/v1/chat/completions").unwrap(), Route::Chat);
        assert_eq!(route(Method::Get, "/models").unwrap(), Route::Models);
        assert_eq!(
            route(Method::Head, "/v1/models/m.gguf").unwrap(),
            Route::Model("m.gguf".into())
        );
        assert_eq!(route(Method::Get, "/v1/models/").unwrap_err().status, 404);
        assert_eq!(route(Method::Get, "/v1/nope").unwrap_err().status, 404);
        assert_eq!(route(Method::Get, "/v1").unwrap_err().status, 404);
        assert_eq!(route(Method::Post, "/api/chat").unwrap(), Route::OllamaChat);
        assert_eq!(route(Method::Head, "/api/tags").unwrap(), Route::OllamaTags);
        assert!(route(Method::Post, "/api/generate").unwrap().takes_body());
        assert!(!route(Method::Get, "/api/version").unwrap().takes_body());
        // Ollama's endpoints for managing models are not here; only under /api/ is Ollama's.
        assert_eq!(route(Method::Post, "/api/pull").unwrap_err().status, 404);
        assert_eq!(route(Method::Post, "/v1/api/chat").unwrap_err().status, 404);
        assert!(is_ollama("/api/pull") && !is_ollama("/v1/chat/completions") && !is_ollama("/api"));
    }

    #[test]
    fn only_the_page_and_health_are_open() {
        let open: Vec<&str> = ROUTES.iter().filter(|r| !r.needs_key).map(|r| r.path).collect();
        assert_eq!(open, ["/", "/health"]);
        assert!(needs_key("/unknown"));
        assert!(needs_key("/v1/models/x"));
    }
}
