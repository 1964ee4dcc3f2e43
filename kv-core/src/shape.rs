//! The attention geometry of a model, as far as the cache cares.

use crate::{KvError, Result};

/// Layers and heads of a decoder: what decides the size of its KV cache.
///
/// Multi-head attention has as many KV heads as query heads; grouped-query attention (GQA)
/// shares each KV head among a group of query heads; multi-query attention (MQA) has one.
///
/// ```
/// use kv_core::ModelShape;
/// let smollm2 = ModelShape::new(30, 9, 3, 64)?;
/// assert_eq!(smollm2.group_size(), 3);
/// assert!(ModelShape::new(30, 9, 4, 64).is_err()); // 9 query heads cannot share 4 KV heads
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelShape {
    n_layers: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl ModelShape {
    /// Starts a shape whose sizes are named as they are set, so they cannot be swapped:
    /// `ModelShape::new(30, 9, 3, 64)` and `ModelShape::new(30, 3, 9, 64)` look alike.
    ///
    /// ```
    /// use kv_core::ModelShape;
    /// let smollm2 = ModelShape::builder().layers(30).q_heads(9).kv_heads(3).head_dim(64).build()?;
    /// assert_eq!(smollm2, ModelShape::preset("smollm2-135m")?);
    /// assert!(ModelShape::builder().layers(30).q_heads(9).build().is_err()); // sizes missing
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn builder() -> ModelShapeBuilder {
        ModelShapeBuilder::default()
    }

    /// Checks and builds a shape from positional sizes: layers, query heads, KV heads,
    /// head dim. [`ModelShape::builder`] names them.
    ///
    /// # Errors
    /// [`KvError::InvalidShape`] when a size is zero or `n_q_heads` is not a multiple of
    /// `n_kv_heads`.
    pub fn new(
        n_layers: usize,
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let zero = [
            ("layers", n_layers),
            ("query heads", n_q_heads),
            ("KV heads", n_kv_heads),
            ("head dim", head_dim),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((name, _)) = zero {
            return Err(KvError::InvalidShape {
                detail: format!("{name} must be at least 1"),
            });
        }
        if !n_q_heads.is_multiple_of(n_kv_heads) {
            return Err(KvError::InvalidShape {
                detail: format!(
                    "{n_q_heads} query heads cannot be split evenly over {n_kv_heads} KV heads"
                ),
            });
        }
        Ok(Self {
            n_layers,
            n_q_heads,
            n_kv_heads,
            head_dim,
        })
    }

    /// A well-known model's shape by name (`llama-2-7b`, `llama-2-13b`, `llama-2-70b`,
    /// `llama-3-8b`, `llama-3-70b`, `mistral-7b`, `smollm2-135m`).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a name not in the list; the message lists them.
    pub fn preset(name: &str) -> Result<Self> {
        let (l, q, kv, d) = match name.to_ascii_lowercase().as_str() {
            "llama-2-7b" => (32, 32, 32, 128),
            "llama-2-13b" => (40, 40, 40, 128),
            "llama-2-70b" => (80, 64, 8, 128),
            "llama-3-8b" | "llama-3.1-8b" => (32, 32, 8, 128),
            "llama-3-70b" | "llama-3.1-70b" => (80, 64, 8, 128),
            "mistral-7b" => (32, 32, 8, 128),
            "smollm2-135m" => (30, 9, 3, 64),
            _ => {
                return Err(KvError::InvalidArgument {
                    what: "preset",
                    detail: format!(
                        "unknown model {name:?}; known: {}",
                        Self::PRESETS.join(", ")
                    ),
                })
            }
        };
        Self::new(l, q, kv, d)
    }

    /// Names accepted by [`ModelShape::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3-8b",
        "llama-3-70b",
        "mistral-7b",
        "smollm2-135m",
    ];

    /// Decoder layers, each with its own K and V.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }
    /// Query heads per layer.
    pub fn n_q_heads(&self) -> usize {
        self.n_q_heads
    }
    /// KV heads per layer (equal to query heads for MHA, 1 for MQA).
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Query heads that read each KV head.
    pub fn group_size(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }
    /// The same model with one KV head per query head: what GQA/MQA saves is measured
    /// against this.
    pub fn as_multi_head(&self) -> Self {
        Self {
            n_kv_heads: self.n_q_heads,
            ..*self
        }
    }
}

/// Names the sizes of a [`ModelShape`] as they are set; see [`ModelShape::builder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelShapeBuilder {
    layers: Option<usize>,
    q_heads: Option<usize>,
    kv_heads: Option<usize>,
    head_dim: Option<usize>,
}

impl ModelShapeBuilder {
    /// Decoder layers.
    pub fn layers(self, n: usize) -> Self {
        Self {
            layers: Some(n),
            ..self
        }
    }
    /// Query heads per layer.
    pub fn q_heads(self, n: usize) -> Self {
        Self {
            q_heads: Some(n),
            ..self
        }
    }
    /// KV heads per layer (as many as query heads for MHA, fewer for GQA, 1 for MQA).
    pub fn kv_heads(self, n: usize) -> Self {
        Self {
            kv_heads: Some(n),
            ..self
        }
    }
    /// Elements per head vector.
    pub fn head_dim(self, n: usize) -> Self {
        Self {
            head_dim: Some(n),
            ..self
        }
    }
    /// Checks and builds the shape.
    ///
    /// # Errors
    /// [`KvError::InvalidShape`] for a size not set, and for what [`ModelShape::new`]
    /// refuses.
    pub fn build(self) -> Result<ModelShape> {
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| KvError::InvalidShape {
                detail: format!("{name} not set"),
            })
        };
        ModelShape::new(
            need(self.layers, "layers")?,
            need(self.q_heads, "query heads")?,
            need(self.kv_heads, "KV heads")?,
            need(self.head_dim, "head dim")?,
        )
    }
}
