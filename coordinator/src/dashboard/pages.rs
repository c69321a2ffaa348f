//! Server-rendered pages. A template receives the page's API document as `d` and its
//! URL as `src`, and shows figures through three functions that take a JSON pointer into
//! `d`, so every figure on a page is marked with where it comes from:
//!
//! - `fig("/a/b")`: the value, as `<span class="fig" data-src data-ptr>`;
//! - `money("/a")`: a money object: its amount (a fig), its status, its proof link;
//! - `chart("/chart")`: the SVG bar chart of `{title, points: [{label, value}]}`.

use super::data::DataError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use std::sync::OnceLock;

/// The stylesheet, served from the coordinator's own origin.
pub const CSS: &str = include_str!("../../templates/dashboard.css");
/// The site icon (so browsers find one and log no error).
pub const FAVICON: &str = include_str!("../../templates/favicon.svg");

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../../templates/base.html")),
    (
        "overview.html",
        include_str!("../../templates/overview.html"),
    ),
    ("nodes.html", include_str!("../../templates/nodes.html")),
    ("node.html", include_str!("../../templates/node.html")),
    ("account.html", include_str!("../../templates/account.html")),
    ("lookup.html", include_str!("../../templates/lookup.html")),
    ("usage.html", include_str!("../../templates/usage.html")),
    ("receipt.html", include_str!("../../templates/receipt.html")),
    ("batches.html", include_str!("../../templates/batches.html")),
    ("login.html", include_str!("../../templates/login.html")),
    ("verify.html", include_str!("../../templates/verify.html")),
    ("error.html", include_str!("../../templates/error.html")),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The value at a JSON pointer into `d`.
fn at(state: &State, ptr: &str) -> Result<Value, Error> {
    let mut v = state
        .lookup("d")
        .ok_or_else(|| Error::new(ErrorKind::UndefinedError, "no document"))?;
    for seg in ptr.split('/').skip(1) {
        let next = match seg.parse::<i64>() {
            Ok(i) if v.kind() == minijinja::value::ValueKind::Seq => v.get_item(&Value::from(i))?,
            _ => v.get_attr(seg)?,
        };
        v = next;
    }
    Ok(v)
}

/// How a JSON value reads on a page (and how the test compares it): strings as they are,
/// `null` as "none".
fn text(v: &Value) -> String {
    if v.is_none() || v.is_undefined() {
        "none".to_owned()
    } else if v.kind() == minijinja::value::ValueKind::Bool {
        v.is_true().to_string()
    } else if let Some(s) = v.as_str() {
        s.to_owned()
    } else {
        v.to_string()
    }
}

fn fig(state: &State, ptr: &str) -> Result<Value, Error> {
    let v = at(state, ptr)?;
    let src = state.lookup("src").map(|s| text(&s)).unwrap_or_default();
    Ok(Value::from_safe_string(format!(
        r#"<span class="fig" data-src="{}" data-ptr="{}">{}</span>"#,
        esc(&src),
        esc(ptr),
        esc(&text(&v))
    )))
}

fn money(state: &State, ptr: &str) -> Result<Value, Error> {
    let m = at(state, ptr)?;
    if m.is_none() || m.is_undefined() {
        return Ok(Value::from_safe_string(
            "<span class=\"none\">none</span>".into(),
        ));
    }
    let amount = fig(state, &format!("{ptr}/amount"))?;
    let status = text(&m.get_attr("status")?);
    let src = state.lookup("src").map(|s| text(&s)).unwrap_or_default();
    let proof = m.get_attr("proof")?;
    let proof = if proof.is_undefined() || proof.is_none() {
        String::new()
    } else {
        format!(
            r#" <a class="proof" href="{}">proof</a>"#,
            esc(&text(&proof))
        )
    };
    Ok(Value::from_safe_string(format!(
        r#"<span class="money" data-status="{st}">{amount} <span class="status status-{st}" data-src="{src}" data-ptr="{p}/status">{st}</span>{proof}</span>"#,
        st = esc(&status),
        src = esc(&src),
        p = esc(ptr),
    )))
}

fn chart(state: &State, ptr: &str) -> Result<Value, Error> {
    let c = at(state, ptr)?;
    let title = text(&c.get_attr("title")?);
    let points = c.get_attr("points")?;
    let mut pts = Vec::new();
    if let Ok(iter) = points.try_iter() {
        for p in iter {
            let label = text(&p.get_attr("label")?);
            let value = text(&p.get_attr("value")?).parse::<f64>().unwrap_or(0.0);
            pts.push((label, value));
        }
    }
    Ok(Value::from_safe_string(format!(
        r#"<figure class="chartbox" data-src="{}" data-ptr="{}">{}</figure>"#,
        esc(&state.lookup("src").map(|s| text(&s)).unwrap_or_default()),
        esc(ptr),
        super::svg::bar_chart(&title, &pts)
    )))
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, src) in TEMPLATES {
            if let Err(e) = env.add_template(name, src) {
                // A template that does not parse is a build defect: the unit test below
                // renders every one.
                tracing::error!(template = name, error = %e, "dashboard template does not parse");
            }
        }
        env.add_function("fig", fig);
        env.add_function("money", money);
        env.add_function("chart", chart);
        env
    })
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Renders `template` with the document `d` from `src`.
pub fn render(
    template: &str,
    title: &str,
    src: &str,
    d: &serde_json::Value,
    user: Option<&str>,
) -> Response {
    let ctx = minijinja::context! {
        d => Value::from_serialize(d),
        src => src,
        title => title,
        user => user,
    };
    match env().get_template(template).and_then(|t| t.render(ctx)) {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => {
            tracing::error!(template, error = %e, "rendering a dashboard page failed");
            html(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "<!doctype html><title>Error</title><p>This page could not be rendered: {}</p>",
                    esc(&e.to_string())
                ),
            )
        }
    }
}

/// An error page with the status that fits.
pub fn error(e: &DataError, user: Option<&str>) -> Response {
    let status = match e {
        DataError::NotFound(_) | DataError::NoSettlement => StatusCode::NOT_FOUND,
        DataError::BadRequest(_) => StatusCode::BAD_REQUEST,
        DataError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut r = render(
        "error.html",
        "Error",
        "",
        &serde_json::json!({"message": e.to_string(), "status": status.as_u16()}),
        user,
    );
    *r.status_mut() = status;
    r
}
