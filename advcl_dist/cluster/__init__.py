"""ClusterFit pseudo-labels: f_pre features and ensemble k-means."""
from .features import extract_features
from .pseudo_labels import CLUSTERS, PSEUDO_LABELS, cluster, ensemble_kmeans

__all__ = ["CLUSTERS", "PSEUDO_LABELS", "cluster", "ensemble_kmeans", "extract_features"]
