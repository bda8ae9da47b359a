"""ClusterFit pseudo-labels: sharded f_pre features and distributed ensemble k-means.

`advcl_dist.cluster.kmeans` is the function of DESIGN §3 (the module is `advcl_dist.cluster.kmeans` in
sys.modules and stays importable as such).
"""
from .features import extract_features
from .kmeans import KMeansResult, fit_kmeans, kmeans
from .pseudo_labels import CLUSTERS, PSEUDO_LABELS, cluster, ensemble_kmeans

__all__ = ["CLUSTERS", "PSEUDO_LABELS", "KMeansResult", "cluster", "ensemble_kmeans", "extract_features",
           "fit_kmeans", "kmeans"]
