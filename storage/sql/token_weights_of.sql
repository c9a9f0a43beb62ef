select rationale_id, token_start, weights, keypoints
from token_weights
where weights_fp = $weights_fp;
