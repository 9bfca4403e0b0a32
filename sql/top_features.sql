-- Features ranked by a statistic over all token rows (zeros included): variance (as in the
-- paper), or frequency (share of tokens where the feature is active).
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param by VARCHAR = variance: variance or frequency
-- @param n INTEGER = 10: features to return
SELECT
    row_number() OVER (
        ORDER BY CASE WHEN $by = 'frequency' THEN frequency ELSE variance END DESC, feature
    ) AS rank,
    feature,
    variance,
    frequency,
    mean,
    max,
    n_active
FROM feature_stats
WHERE sae = $sae AND $by IN ('variance', 'frequency')
ORDER BY rank
LIMIT $n
