//! Tag lists and the catalog, sorted lexically and paginated with `n`,
//! `last` and a `Link: <...>; rel="next"` header.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::Response;

use super::errors::{ApiError, Code};
use super::names;
use super::{blocking, response, Query, Registry};

/// Largest page (also the page size when `n` is not given).
pub(crate) const MAX_PAGE: usize = 10_000;

fn page_size(q: &Query) -> Result<usize, ApiError> {
    match q.get("n") {
        None => Ok(MAX_PAGE),
        Some(s) => s.parse::<usize>().map(|n| n.min(MAX_PAGE)).map_err(|_| {
            ApiError::new(
                Code::PaginationNumberInvalid,
                "n must be a non-negative integer",
            )
        }),
    }
}

/// The page of sorted, distinct `items` after `last`, and whether more
/// follow it.
pub(crate) fn paginate(items: Vec<String>, n: usize, last: Option<&str>) -> (Vec<String>, bool) {
    let mut items = items;
    items.sort_unstable();
    items.dedup();
    let start = last.map_or(0, |l| items.partition_point(|x| x.as_str() <= l));
    let rest = &items[start..];
    let take = n.min(rest.len());
    (rest[..take].to_vec(), rest.len() > take)
}

fn link(path: &str, n: usize, page: &[String], more: bool) -> Option<(header::HeaderName, String)> {
    let last = page.last().filter(|_| more)?;
    Some((
        header::LINK,
        format!("<{path}?n={n}&last={last}>; rel=\"next\""),
    ))
}

/// GET `/v2/<repo>/tags/list`.
pub(crate) async fn list(reg: &Registry, repo: &str, query: &Query) -> Result<Response, ApiError> {
    let n = page_size(query)?;
    let last = query.get("last");
    let store = reg.store().clone();
    let prefix = names::tag_prefix(repo);
    let repo_s = repo.to_owned();
    let (tags, exists) = blocking(move || {
        let all = store.names().map_err(ApiError::internal)?;
        let tags: Vec<String> = all
            .iter()
            .filter_map(|(name, _)| name.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        let exists = !tags.is_empty()
            || all
                .iter()
                .any(|(name, _)| names::repo_of_link(name) == Some(repo_s.as_str()));
        Ok((tags, exists))
    })
    .await?;
    if !exists {
        return Err(
            ApiError::new(Code::NameUnknown, "repository name not known to registry")
                .detail(serde_json::json!({ "name": repo })),
        );
    }
    let (page, more) = paginate(tags, n, last);
    let body = serde_json::json!({ "name": repo, "tags": page }).to_string();
    let mut hdrs = vec![(header::CONTENT_TYPE, "application/json".to_owned())];
    hdrs.extend(link(&format!("/v2/{repo}/tags/list"), n, &page, more));
    response(StatusCode::OK, &hdrs, Body::from(body))
}

/// GET `/v2/_catalog`: every repository with a blob, manifest or tag.
pub(crate) async fn catalog(reg: &Registry, query: &Query) -> Result<Response, ApiError> {
    let n = page_size(query)?;
    let last = query.get("last");
    let store = reg.store().clone();
    let repos = blocking(move || {
        let all = store.names().map_err(ApiError::internal)?;
        let set: BTreeSet<&str> = all
            .iter()
            .filter_map(|(name, _)| names::repo_of_link(name))
            .collect();
        Ok(set.into_iter().map(str::to_owned).collect::<Vec<_>>())
    })
    .await?;
    let (page, more) = paginate(repos, n, last);
    let body = serde_json::json!({ "repositories": page }).to_string();
    let mut hdrs = vec![(header::CONTENT_TYPE, "application/json".to_owned())];
    hdrs.extend(link("/v2/_catalog", n, &page, more));
    response(StatusCode::OK, &hdrs, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let items: Vec<String> = ["c", "a", "b", "d", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            paginate(items.clone(), 2, None),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            paginate(items.clone(), 2, Some("b")),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(
            paginate(items.clone(), 10, Some("bb")),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(paginate(items, 0, None), (vec![], true));
    }
}
