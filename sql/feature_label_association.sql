-- Features that fire more on one label's samples than on the others': per (feature, label), the
-- mean activation over that label's tokens (zeros included) minus the mean over all other tokens,
-- and the same for activation frequency. The top n per label (or for one label) by difference;
-- features never active on a label are not listed for it.
-- @param sae VARCHAR: SAE name (or give layer=L [model=KEY] to use that layer's only encoded SAE)
-- @param label VARCHAR = NULL: only this label (default: every label)
-- @param n INTEGER = 10: features per label
WITH lab AS (
    SELECT label, sum(n_tokens) AS n_tok FROM samples GROUP BY label
),
tot AS (
    SELECT sum(n_tok) AS n_all FROM lab
),
f AS (
    SELECT row, feature, value FROM features WHERE sae = $sae
),
fl AS (
    SELECT f.feature, s.label, sum(f.value) AS s_val, count(*) AS n_act
    FROM f ASOF JOIN samples AS s ON f.row >= s.first_row
    GROUP BY f.feature, s.label
),
ft AS (
    SELECT feature, sum(s_val) AS s_all, sum(n_act) AS n_act_all FROM fl GROUP BY feature
),
scored AS (
    SELECT
        fl.feature,
        fl.label,
        fl.s_val / lab.n_tok AS mean_label,
        (ft.s_all - fl.s_val) / nullif(tot.n_all - lab.n_tok, 0) AS mean_other,
        fl.n_act / lab.n_tok AS freq_label,
        (ft.n_act_all - fl.n_act) / nullif(tot.n_all - lab.n_tok, 0) AS freq_other
    FROM fl
    JOIN lab ON lab.label IS NOT DISTINCT FROM fl.label
    JOIN ft ON ft.feature = fl.feature
    CROSS JOIN tot
)
SELECT
    label,
    row_number() OVER (PARTITION BY label ORDER BY mean_label - coalesce(mean_other, 0) DESC, feature) AS rank,
    feature,
    mean_label - coalesce(mean_other, 0) AS mean_diff,
    mean_label,
    mean_other,
    freq_label,
    freq_other
FROM scored
WHERE $label IS NULL OR label = $label
QUALIFY rank <= $n
ORDER BY label, rank
