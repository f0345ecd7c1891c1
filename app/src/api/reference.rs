//! The API reference page's data: the operations of the application API's OpenAPI document (which the
//! server generates from its handlers and hands to the console as [`OpenApiDocument`]).

use leptos::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The OpenAPI document, provided by the server as context.
#[cfg(feature = "ssr")]
#[derive(Clone, Debug)]
pub struct OpenApiDocument(pub std::sync::Arc<serde_json::Value>);

/// One tag (section) of the reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The tag.
    pub name: String,
    /// What it is about.
    pub description: String,
    /// Its operations, in the document's order.
    pub operations: Vec<Operation>,
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// `GET`, `POST`...
    pub method: String,
    /// The path template.
    pub path: String,
    /// The operation id (IoTDA's name, e.g. `CreateBatchTask`).
    pub operation_id: String,
    /// One line.
    pub summary: String,
    /// The rest, as text.
    pub description: String,
    /// Parameters: name, location, required, description.
    pub parameters: Vec<Parameter>,
    /// Request body media types.
    pub request: Vec<String>,
    /// Status and description of each response.
    pub responses: Vec<(String, String)>,
}

/// One parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parameter {
    /// Name.
    pub name: String,
    /// `path`, `query` or `header`.
    pub location: String,
    /// Whether it is required.
    pub required: bool,
    /// What it means.
    pub description: String,
}

/// The reference: the document's title, version, and its operations by tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// Title.
    pub title: String,
    /// API version.
    pub version: String,
    /// Introduction.
    pub description: String,
    /// Sections by tag.
    pub sections: Vec<Section>,
}

/// The application API's reference.
#[server(prefix = "/api", endpoint = "api_reference")]
pub async fn api_reference() -> Result<Reference, ApiError> {
    use crate::error::ErrorCode;
    super::ssr::context().await?;
    let doc = use_context::<OpenApiDocument>()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "the API document is missing"))?;
    Ok(reference(&doc.0))
}

/// Reads the sections out of an OpenAPI 3.1 document.
#[cfg(feature = "ssr")]
#[must_use]
pub fn reference(doc: &serde_json::Value) -> Reference {
    use serde_json::Value;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut sections: Vec<Section> = doc["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| Section {
            name: text(&t["name"]),
            description: text(&t["description"]),
            operations: Vec::new(),
        })
        .collect();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in ["get", "post", "put", "delete", "patch"] {
            let op = &item[method];
            if op.is_null() {
                continue;
            }
            let tag = op["tags"][0].as_str().unwrap_or("other").to_owned();
            let operation = Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                operation_id: text(&op["operationId"]),
                summary: text(&op["summary"]),
                description: text(&op["description"]),
                parameters: op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| Parameter {
                        name: text(&p["name"]),
                        location: text(&p["in"]),
                        required: p["required"].as_bool().unwrap_or(false),
                        description: text(&p["description"]),
                    })
                    .collect(),
                request: op["requestBody"]["content"]
                    .as_object()
                    .map(|c| c.keys().cloned().collect())
                    .unwrap_or_default(),
                responses: op["responses"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(status, r)| (status.clone(), text(&r["description"])))
                    .collect(),
            };
            match sections.iter_mut().find(|s| s.name == tag) {
                Some(s) => s.operations.push(operation),
                None => sections.push(Section {
                    name: tag,
                    description: String::new(),
                    operations: vec![operation],
                }),
            }
        }
    }
    sections.retain(|s| !s.operations.is_empty());
    Reference {
        title: text(&doc["info"]["title"]),
        version: text(&doc["info"]["version"]),
        description: text(&doc["info"]["description"]),
        sections,
    }
}

#[cfg(all(test, feature = "ssr"))]
mod tests {
    #[test]
    fn operations_are_grouped_by_their_first_tag() {
        let doc = serde_json::json!({
            "info": {"title": "T", "version": "1"},
            "tags": [{"name": "packages", "description": "P"}, {"name": "empty"}],
            "paths": {
                "/a": {
                    "get": {"tags": ["packages"], "operationId": "ListA", "summary": "List",
                            "parameters": [{"name": "limit", "in": "query", "description": "rows"}],
                            "responses": {"200": {"description": "OK"}}},
                    "post": {"tags": ["x"], "operationId": "CreateA",
                             "requestBody": {"content": {"application/json": {}}}}
                }
            }
        });
        let r = super::reference(&doc);
        assert_eq!(r.sections.len(), 2);
        assert_eq!(r.sections[0].operations[0].operation_id, "ListA");
        assert_eq!(r.sections[0].operations[0].parameters[0].location, "query");
        assert_eq!(r.sections[1].name, "x");
        assert_eq!(
            r.sections[1].operations[0].request,
            vec!["application/json".to_owned()]
        );
    }
}
